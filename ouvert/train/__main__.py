"""`python -m ouvert.train CONFIG.toml [--key value ...] [--resume]`, the entry point for torchrun:

    torchrun --nproc_per_node 2 -m ouvert.train configs/demo.toml --distributed fsdp
"""

import sys

from ouvert.train.config import TrainConfig
from ouvert.train.loop import train


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    resume = "--resume" in args
    args = [a for a in args if a != "--resume"]
    path = args.pop(0) if args and not args[0].startswith("--") else None
    try:
        cfg = TrainConfig.load(path, args)
        out = train(cfg, resume=resume)
    except (ValueError, FileNotFoundError) as e:
        print(f"ouvert train: error: {e}", file=sys.stderr)
        return 2
    print(f"final checkpoint: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
