"""Pre-build DeepSpeed's CPU C++ ops (cpu_adam, shm_comm) into the torch extensions cache.

Run once by ./run.sh at set-up so the learner's first start does not spend ~2.5 minutes compiling.
"""

from __future__ import annotations

import time


def main() -> None:
    import torch

    if torch.cuda.is_available():
        return  # GPU boxes use the fused CUDA ops, built by DeepSpeed on demand.
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    for name in ("CPUAdamBuilder", "ShareMemCommBuilder"):
        builder = accel.create_op_builder(name)
        if builder is None:
            print(f"[setup_ops] {name}: not offered by the {accel.device_name()} accelerator", flush=True)
            continue
        t0 = time.time()
        builder.load(verbose=False)
        print(f"[setup_ops] built {builder.name} in {time.time() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()
