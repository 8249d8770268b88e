"""Train a LongNet model.

    deepspeed launch/train.py --config configs/tiny-cpu.yaml [section.key=value ...]
    torchrun --nproc_per_node 2 launch/train.py --config configs/tiny-cpu-sp2.yaml
    python launch/train.py --config configs/tiny-cpu.yaml train.steps=20

The trainer lives in longnet.launch.trainer; this file only calls it.
"""

from longnet.launch.trainer import main

if __name__ == "__main__":
    main()
