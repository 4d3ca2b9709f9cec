"""``lazydp train``: private training on a built-in real dataset or a preprocessed directory.

Example:
    $ lazydp train                       # private DLRM on MovieLens-100k, LazyDP, epsilon 3
    $ lazydp train --mode dpsgd_f --target-epsilon 1
    $ lazydp train --config configs/movielens.yaml --epochs 5
    $ lazydp train --data out/criteo --json
Options come from --config (YAML, keys = flag names with underscores) and are overridden by flags.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING, Any

from lazydp.cli import add_json_flag, load_yaml_mapping
from lazydp.errors import ConfigError

if TYPE_CHECKING:  # imported where used: lazydp.training pulls in torch (`--help` took 2 s)
    from lazydp.train_config import TrainConfig

EPILOG = """example (2 quiet cores; AUC 0.72-0.755 from run to run):
  $ lazydp train
  train: 100%|██████████| 440/440 [00:07<00:00, 62.42step/s, eps=2.999, ex_s=255,868, loss=0.5817]
  privacy: epsilon = 2.999 at delta = 1e-05 (PLD; RDP gives 3.29)
    mode lazydp, sampler poisson, 440 steps, noise multiplier 1.55859375, max grad norm 4.0, ...
  test AUC 0.7526  accuracy 0.6879  log-loss 0.6150  (440 steps, 7.0 s, 255,722 examples/s)
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model privately (default: DLRM on MovieLens, LazyDP)",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML file of options (flags override it)")
    p.add_argument("--dataset", choices=["movielens", "acs"], help="built-in real dataset")
    p.add_argument("--data", help="preprocessed directory (from `lazydp preprocess`)")
    p.add_argument("--mode", choices=["sgd", "dpsgd_b", "dpsgd_r", "dpsgd_f", "lazydp"])
    p.add_argument("--epochs", type=float)
    p.add_argument("--batch-size", type=int, help="expected batch size (sets q = B / N)")
    p.add_argument("--lr", type=float, help="learning rate of the embedding tables (SGD)")
    p.add_argument("--weight-decay", type=float, help="SGD weight decay of the embedding tables")
    p.add_argument("--momentum", type=float, help="SGD momentum of the embedding tables")
    p.add_argument("--dense-lr", type=float, help="learning rate of the MLPs")
    p.add_argument("--dense-optimizer", choices=["adam", "sgd"], help="optimizer of the MLPs")
    p.add_argument("--noise-multiplier", type=float)
    p.add_argument("--target-epsilon", type=float, help="calibrate the noise to this epsilon")
    p.add_argument(
        "--delta",
        type=float,
        help="the run's whole delta, a DP vocabulary's included (default: the largest power "
        "of ten below 1/N)",
    )
    p.add_argument(
        "--max-grad-norm",
        type=float,
        help="per-example clipping norm C (default 4; 1 ranks a little better but is overconfident)",
    )
    p.add_argument("--sampler", choices=["poisson", "shuffle"])
    p.add_argument("--embedding-dim", type=int)
    p.add_argument("--seed", type=int, help="reproducible research run (not for production)")
    p.add_argument("--model-seed", type=int, help="model initialisation seed (default 0)")
    p.add_argument(
        "--out",
        help="output directory (ledger, checkpoints, model, report; default runs/latest); one "
        "that holds a ledger is refused without --resume",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        help="steps between atomic checkpoints (default 0: one every 10 minutes of training)",
    )
    p.add_argument("--resume", action="store_true", default=None, help="continue OUT's run")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.add_argument("--nproc-per-node", type=int, help="launch N processes with torchrun")
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--rdzv-endpoint", default=None)
    p.add_argument("--max-restarts", type=int, default=0)
    add_json_flag(p)
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults <- the dataset's defaults <- YAML file <- flags; validated (ConfigError)."""
    from lazydp.train_config import DATASET_DEFAULTS, TrainConfig

    file_values = load_yaml_mapping(args.config, "--config") if args.config else {}
    if isinstance(file_values.get("no_progress"), bool):
        # The flag --no-progress with underscores, as the help says keys are (the option
        # itself is called progress): no_progress: true was refused as an unknown key.
        file_values["progress"] = not file_values.pop("no_progress")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(file_values) - names
    if unknown:
        raise ConfigError(
            f"unknown option(s) {sorted(unknown)} in {args.config}; valid: {sorted(names)}"
        )
    flag_values = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    # --noise-multiplier and --target-epsilon are two ways to set the noise: one of them would be
    # silently ignored, so both from the same source are refused; a flag beats the file's other.
    noise_keys = ("noise_multiplier", "target_epsilon")
    for source, given in (
        ("the command line", flag_values),
        (f"--config {args.config}", file_values),
    ):
        if all(given.get(k) is not None for k in noise_keys):
            raise ConfigError(
                f"both noise_multiplier and target_epsilon are given in {source}; give one "
                "(--target-epsilon calibrates the noise multiplier for you)"
            )
    for mine, other in (noise_keys, noise_keys[::-1]):
        if flag_values.get(mine) is not None:
            file_values.pop(other, None)
    values = {**file_values, **flag_values}
    noise_given = sorted(k for k in noise_keys if values.get(k) is not None)
    if values.get("mode") == "sgd" and noise_given:
        # sgd neither clips nor noises: the setting would be silently ignored.
        raise ConfigError(
            f"mode sgd is the non-private reference (no clipping, no noise), so "
            f"{' and '.join(noise_given)} would be ignored; drop it, or pick a private mode "
            "(e.g. --mode lazydp)."
        )
    if values.get("data") and values.get("dataset") is not None:
        # --data wins; the built-in dataset named beside it would be silently ignored.
        raise ConfigError(
            f"both dataset ({values['dataset']!r}, a built-in dataset) and data "
            f"({values['data']!r}, a preprocessed directory) are given; give one."
        )
    dataset = values.get("dataset", "movielens")
    if not values.get("data") and isinstance(dataset, str):
        values = {**DATASET_DEFAULTS.get(dataset, {}), **values}
    if values.get("noise_multiplier") is not None and "target_epsilon" not in values:
        values["target_epsilon"] = None
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg


def _check_launch_flags(args: argparse.Namespace) -> bool:
    """Whether to launch through torchrun; ConfigError for launch flags that would be ignored."""
    nproc = args.nproc_per_node
    if nproc is not None and nproc < 1:
        raise ConfigError(f"--nproc-per-node={nproc} must be >= 1 (processes per node)")
    if args.nnodes < 1 or args.max_restarts < 0:
        raise ConfigError(
            f"--nnodes={args.nnodes} must be >= 1 and --max-restarts={args.max_restarts} >= 0"
        )
    if (nproc or 1) > 1 or args.nnodes > 1:
        args.nproc_per_node = nproc or 1  # --nnodes 2 alone: one process on each node
        return True
    if args.max_restarts or args.rdzv_endpoint:
        raise ConfigError(
            "--max-restarts and --rdzv-endpoint only apply to a distributed run (--nproc-per-node "
            ">= 2 or --nnodes >= 2); a single-process run continues after a crash with --resume"
        )
    return False


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = config_from_args(args)
    if _check_launch_flags(args):
        if cfg.sampler == "shuffle":
            # Refused here, before torchrun starts workers that would each open a ledger.
            raise ConfigError(
                "--sampler shuffle is single-process only (each rank would shuffle the whole "
                "data set, so one example could be in two ranks' batches of a step); a "
                "distributed run samples with --sampler poisson (the default)."
            )
        from lazydp.distributed.launch import launch

        return launch(args, cfg)
    from lazydp.distributed.launch import init_from_env, prepare_restart
    from lazydp.training import run as train_run

    if args.json:
        cfg.progress = False
    # Under `torchrun -m lazydp train ...` this joins the process group; otherwise (0, 1).
    rank, world_size = init_from_env()
    prepare_restart(cfg, rank)
    return train_run(cfg, rank=rank, world_size=world_size)
