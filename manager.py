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

    def log_record(self):
        """ train.py's log of the last forward: aux and z-loss and dropped share (means over the MoE layers), the
        largest expert share of any layer, and every expert's share of its layer's assignments. {} when dense """
        if not self.routing:
            return {}
        n_moe = len(self.routing)
        routing = {str(layer): ((tokens / tokens.sum()).tolist(), dropped.item())
                   for layer, (tokens, dropped) in self.routing.items()}
        return dict(aux=self.aggregate_aux_loss().item() / n_moe if self.aux_loss else 0.0,
                    z=self.aggregate_router_z_loss().item() / n_moe if self.router_z_loss else 0.0,
                    drop=sum(dropped for _, dropped in routing.values()) / n_moe,
                    top_share=max(max(shares) for shares, _ in routing.values()), routing=routing)


MANAGER = MOEManager()
