"""Peak memory of one VAE decode with and without tiling, for the README's memory section.

The SD 1.5 / 2.x VAE (official config, random weights: memory and time do not depend on the values), float32 on the
CPU, one decode of a (1, 4, S/8, S/8) latent to an S x S image.

Measured: each decode runs in a fresh process; its memory is the process's peak resident set (getrusage) minus its
resident set just before the decode, with the weights loaded and the latent made.
Estimated (--estimate, no arithmetic, seconds even at 2048): the same decode on the meta device, counting the bytes
of the tensors alive at each moment (a storage counts from the op that makes it until its last tensor is freed);
attention runs the CPU's fused kernel as on a real CPU. This is the lower bound of the measured figure (it leaves out
kernels' scratch space and the allocator's slack).

    OMP_NUM_THREADS=1 python docs/vae_memory.py --size 512 1024
    python docs/vae_memory.py --estimate --size 512 1024 2048
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import weakref


def resident_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def measure(size: int, tiling: bool) -> dict:
    """One decode in this process: its extra peak resident memory (MiB) and wall time (s)."""
    import torch

    from diffedit.models import vae_tiling
    from diffedit.models.config import VAEConfig
    from diffedit.models.vae import AutoencoderKL
    from diffedit.official_configs import SD_VAE

    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig.from_dict(SD_VAE)).eval().requires_grad_(False)
    z = torch.randn(1, 4, size // 8, size // 8)
    before = resident_mib()
    start = time.perf_counter()
    with torch.no_grad():
        image = vae_tiling.decode(vae, z, tiling=tiling)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    assert image.shape == (1, 3, size, size)
    return {"size": size, "tiling": tiling, "decode_peak_mib": round(peak - before), "seconds": round(seconds, 1),
            "weights_and_latent_mib": round(before)}


def estimate(size: int, tiling: bool) -> dict:
    """The peak of live tensor bytes (MiB) of one decode and of one encode, on the meta device."""
    import torch
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from diffedit.models import vae_tiling
    from diffedit.models.config import VAEConfig
    from diffedit.models.vae import AutoencoderKL
    from diffedit.official_configs import SD_VAE

    class LiveBytes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.tensors, self.nbytes, self.live, self.peak = {}, {}, 0, 0

        def release(self, key) -> None:
            self.tensors[key] -= 1
            if self.tensors[key] == 0:
                self.live -= self.nbytes.pop(key)
                del self.tensors[key]

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    key = t.untyped_storage()._cdata  # views share their base's storage
                    if key not in self.tensors:
                        self.tensors[key], self.nbytes[key] = 0, t.untyped_storage().nbytes()
                        self.live += self.nbytes[key]
                        self.peak = max(self.peak, self.live)
                    self.tensors[key] += 1
                    weakref.finalize(t, self.release, key)
            return out

    # On meta, scaled_dot_product_attention takes the math path (a (HW)^2 score matrix); a CPU takes the fused one
    F.scaled_dot_product_attention = lambda q, k, v: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v)[0]
    with torch.device("meta"):
        vae = AutoencoderKL(VAEConfig.from_dict(SD_VAE)).eval().requires_grad_(False)
        z, x = torch.empty(1, 4, size // 8, size // 8), torch.empty(1, 3, size, size)
    with torch.no_grad(), LiveBytes() as decoding:
        image = vae_tiling.decode(vae, z, tiling=tiling)
        assert image.shape == (1, 3, size, size)
        del image
    with torch.no_grad(), LiveBytes() as encoding:
        posterior = vae_tiling.encode(vae, x, tiling=tiling)
        assert posterior.mean.shape == (1, 4, size // 8, size // 8)
        del posterior
    return {"size": size, "tiling": tiling, "estimated_decode_peak_mib": round(decoding.peak / 2**20),
            "estimated_encode_peak_mib": round(encoding.peak / 2**20)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--estimate", action="store_true", help="count live tensor bytes on the meta device")
    parser.add_argument("--one", nargs=2, metavar=("SIZE", "TILING"), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(int(args.one[0]), args.one[1] == "1")))
        return
    for size in args.size:
        for tiling in (False, True):
            if args.estimate:
                print(json.dumps(estimate(size, tiling)), flush=True)
                continue
            out = subprocess.run([sys.executable, __file__, "--one", str(size), str(int(tiling))], check=True,
                                 capture_output=True, text=True).stdout
            print(out.strip(), flush=True)


if __name__ == "__main__":
    main()
