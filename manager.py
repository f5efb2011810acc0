"""
MANAGER collects what the MoE layers compute on the side during one forward pass: their
load-balancing and router z-losses (which GPT.forward adds to the loss) and their routing
statistics (which train.py logs). GPT.forward resets it first, so nothing leaks between steps,
or between train and eval. The list API is the earlier nanoMoE's.
"""


class MOEManager:

    def __init__(self):
        self.aux_loss = []  # one scalar tensor per MoE layer
        self.router_z_loss = []  # one scalar tensor per MoE layer
        self.routing = {}  # layer index -> (tokens per expert (E,) before dropping, dropped fraction ()), detached

    def reset(self):
        self.reset_aux_loss()
        self.reset_router_z_loss()
        self.routing.clear()

    def reset_aux_loss(self):
        self.aux_loss.clear()

    def reset_router_z_loss(self):
        self.router_z_loss.clear()

    def add_aux_loss(self, loss):
        self.aux_loss.append(loss)

    def add_router_z_loss(self, loss):
        self.router_z_loss.append(loss)

    def aggregate_aux_loss(self):
        return sum(self.aux_loss)

    def aggregate_router_z_loss(self):
        return sum(self.router_z_loss)

    def add_routing_stats(self, layer_idx, tokens_per_expert, dropped_frac):
        self.routing[layer_idx] = (tokens_per_expert, dropped_frac)


MANAGER = MOEManager()
