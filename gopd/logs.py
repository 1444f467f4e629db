"""Metrics to a JSONL file, the console, and TensorBoard / W&B when asked for."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from gopd.config import TrainConfig, to_dict

logger = logging.getLogger("gopd")


class MetricsLogger:
    def __init__(self, cfg: TrainConfig, console=print):
        self.cfg, self.console = cfg, console
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        self.jsonl = open(Path(cfg.output_dir) / "metrics.jsonl", "a") if "jsonl" in cfg.loggers else None
        self.tensorboard = self.wandb = None
        if "tensorboard" in cfg.loggers:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ValueError("loggers includes 'tensorboard' but tensorboard is not installed") from exc
            self.tensorboard = SummaryWriter(str(Path(cfg.output_dir) / "tensorboard"))
        if "wandb" in cfg.loggers:
            try:
                import wandb
            except ImportError as exc:
                raise ValueError("loggers includes 'wandb' but wandb is not installed") from exc
            self.wandb = wandb.init(project=cfg.wandb_project, config=to_dict(cfg), dir=cfg.output_dir)

    def log(self, step: int, metrics: dict, kind: str = "train") -> None:
        record = {"step": step, "kind": kind, **metrics}
        if self.jsonl:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if "console" in self.cfg.loggers:
            shown = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
            self.console(f"[{kind} {step}] {shown}")
        if self.tensorboard:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tensorboard.add_scalar(f"{kind}/{k}", v, step)
        if self.wandb:
            self.wandb.log({f"{kind}/{k}": v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class NoMetrics:
    """The metrics sink of the ranks other than 0 under data parallelism: rank 0 logs the step's
    metrics, which are already summed over the ranks."""

    def log(self, step: int, metrics: dict, kind: str = "train") -> None:
        pass

    def close(self) -> None:
        pass
