"""Training: one loop for every objective, on one process or many.

- config.py: `TrainConfig`, the run's settings, from TOML and `--key value` flags
- loop.py: `train(TrainConfig)`, the loop (schedule, accumulation, clipping, eval, logging)
- tasks.py: `make_task`, the objective a config names; objectives.py (pretrain, SFT),
  preference.py (DPO), grpo.py (GRPO and its rewards)
- balance.py: DeepSeek MoE load balancing (router bias, sequence-wise balance loss)
- lora.py: LoRA adapters in PEFT's layout
- state.py: checkpoints of a run (save, exact resume, provenance)
- distributed.py: torchrun, DDP and FSDP2, applied from outside the model
- reproduce.py: `ouvert reproduce`, re-running a recorded training
- arithmetic.py, french.py: worked examples (SFT then GRPO on a CPU)
"""

from ouvert.train.config import TrainConfig
from ouvert.train.loop import train

__all__ = ["TrainConfig", "train"]
