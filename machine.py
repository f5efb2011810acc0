"""
The machine the scripts run on: the device and dtype they pick, and a GPU's peak FLOP/s for MFU.
"""
import torch


# bf16 dense tensor-core peaks, FLOP/s, from NVIDIA's datasheets (whose headline figures, with 2:4 sparsity, are
# twice
# these); the first name that occurs in the GPU's name wins
GPU_PEAK_FLOPS = {'H100 PCIe': 756e12, 'H100 NVL': 835e12, 'H100': 989e12, 'H200 NVL': 835e12, 'H200': 989e12,
                  'A100': 312e12}


def pick_device(device='', dtype=''):
    """ The scripts' device and dtype, each as given or, where '', picked: CUDA if there, else Apple's mps, else
    the CPU; bfloat16 where CUDA supports it, else float16 on CUDA (with a GradScaler), float32 elsewhere.
    Returns (device, device_type, dtype) """
    if not device:
        device = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
    device_type = 'cuda' if 'cuda' in device else 'mps' if 'mps' in device else 'cpu'
    if not dtype:
        dtype = 'float32' if device_type != 'cuda' else 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
    return device, device_type, dtype


def gpu_peak_flops(device):
    """ the bf16 peak of a CUDA device, or 0.0 for a GPU not in GPU_PEAK_FLOPS: no MFU rather than a wrong one """
    name = torch.cuda.get_device_name(device)
    return next((flops for gpu, flops in GPU_PEAK_FLOPS.items() if gpu in name), 0.0)
