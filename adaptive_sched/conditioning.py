"""Class conditioning: label dropout for classifier-free guidance (CFG), the guided prediction, and the condition
a conditional schedule sees (the class label, or a bin of a simple input statistic).

CFG (Ho & Salimans 2022): train one network on labels replaced by the null class with probability p_uncond;
sample with ε̂_w = ε̂_uncond + w·(ε̂_cond − ε̂_uncond). Every target (eps, x0, v, flow) is affine in ε̂ at fixed
(x_λ, λ) — x̂0 = (x_λ − σε̂)/α, v̂ = αε̂ − σx̂0, … — so the same combination written in any target's own space,
pred_w = pred_uncond + w·(pred_cond − pred_uncond), gives the same ε̂_w and x̂0_w: guidance is applied to the
raw network output, whatever it predicts. w = 1 is the conditional model, w = 0 the unconditional one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from adaptive_sched.errors import UsageError


def drop_labels(y: torch.Tensor, p_uncond: float, null_class: int, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """Labels (N,) with each one replaced by `null_class` independently with probability p_uncond."""
    if p_uncond <= 0:
        return y
    drop = torch.rand(y.shape, generator=generator, device=y.device) < p_uncond        # (N,)
    return torch.where(drop, torch.full_like(y, null_class), y)


def balanced_labels(n: int, num_classes: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """0, 1, …, K−1, 0, 1, … (n,) int64: equal class counts (±1) for conditional sampling and FID."""
    return torch.arange(n, device=device) % num_classes


SAMPLE_LABELS = ("held_out", "balanced")


def eval_labels(how: str, held_out_y: torch.Tensor, n: int, num_classes: int) -> torch.Tensor:
    """The labels of the n samples an eval scores against the first n held-out rows: "held_out" their own labels
    (the samples' class mix is the reference's, whatever the data's class frequencies), "balanced" equal counts."""
    if how == "balanced":
        return balanced_labels(n, num_classes)
    return held_out_y[:n].to("cpu", torch.int64)


def check_class_labels(train_y: torch.Tensor, held_out_y: torch.Tensor | None, num_classes: int) -> None:
    """UsageError unless every label is in 0..K−1 and every class occurs in the training data: a class with no
    training example would get untrained embeddings, and samples of it would be scored as if trained."""
    for name, y in (("training", train_y), ("held-out", held_out_y)):
        if y is not None and len(y) and not (0 <= int(y.min()) and int(y.max()) < num_classes):
            raise UsageError(f"{name} labels must be in 0..{num_classes - 1}, got {int(y.min())}..{int(y.max())}")
    counts = torch.bincount(train_y.cpu(), minlength=num_classes)
    missing = torch.nonzero(counts == 0).flatten().tolist()
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise UsageError(f"class labels must run 0..{num_classes - 1} with every class in the training data; "
                         f"no training example has label {shown} (renumber the labels, or use more of the data)")


def guided_prediction(model, x: torch.Tensor, logsnr: torch.Tensor, y: torch.Tensor | None, guidance: float,
                      null_class: int) -> torch.Tensor:
    """pred_uncond + w·(pred_cond − pred_uncond) in the network's own target space; one batched call for both
    branches (w = 1: the conditional call only; w = 0: the unconditional call only; y = None: unconditional)."""
    if y is None:
        return model(x, logsnr, None)
    if guidance == 1.0:
        return model(x, logsnr, y)
    null = torch.full_like(y, null_class)
    if guidance == 0.0:
        return model(x, logsnr, null)
    both = model(torch.cat([x, x]), torch.cat([logsnr, logsnr]), torch.cat([y, null]))     # (2N, ...)
    cond, uncond = both.chunk(2)
    return uncond + guidance * (cond - uncond)


def check_guidance(scales, conditional: bool, p_uncond: float | None = None) -> list[float]:
    """The [eval] guidance scales as floats; UsageError unless finite, >= 0, and (when w != 1) the model is
    conditional with a trained unconditional branch (p_uncond > 0, when given)."""
    scales = [float(w) for w in scales]
    if not scales:
        raise UsageError("[eval] guidance needs at least one scale, e.g. [1.0]")
    if any(not math.isfinite(w) or w < 0 for w in scales):
        raise UsageError(f"[eval] guidance scales must be finite and >= 0, got {scales}")
    if len(set(scales)) != len(scales):
        raise UsageError(f"[eval] guidance scales must be distinct, got {scales}")
    if not conditional and scales != [1.0]:
        raise UsageError(f"guidance scales {scales} need a class-conditional model: set [train] conditional = true")
    if conditional and p_uncond == 0 and scales != [1.0]:
        raise UsageError(f"guidance scales {scales} need the unconditional branch, which [train] p_uncond = 0 never "
                         f"trains (its null class stays at its initial embedding): use w = 1 or p_uncond > 0")
    return scales


GUIDED_METRICS = ("eval_swd", "eval_fid", "eval_kid")    # the sample metrics reported per guidance scale


def guidance_suffix(w: float) -> str:
    """The metric-name suffix for scale w: '@w1.5'."""
    return f"@w{w:g}"


@dataclass
class ScheduleCondition:
    """What a conditional schedule is conditioned on: `class` labels, or `stats:K` — K equal-mass bins of each
    example's standard deviation over its pixels / coordinates, with bin edges from the training set."""

    kind: str                         # "none", "class" or "stats"
    num_classes: int = 0
    edges: torch.Tensor | None = None  # stats: (K−1,) interior quantiles of the training std

    def __call__(self, x0: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor | None:
        """The condition (N,) int64 of a batch (None for kind "none")."""
        if self.kind == "class":
            return y
        if self.kind == "stats":
            return torch.bucketize(example_std(x0), self.edges.to(x0.device))
        return None


def condition_frequencies(cond: torch.Tensor, num_conditions: int) -> torch.Tensor:
    """How often each condition occurs (K,) float64, summing to 1: the weights w_c of the marginal schedule."""
    counts = torch.bincount(cond.cpu(), minlength=num_conditions).double()
    return counts / counts.sum()


def example_std(x0: torch.Tensor) -> torch.Tensor:
    """Standard deviation of each example over all its entries, (N,) float32."""
    return x0.float().flatten(1).std(dim=1)


def parse_condition(spec: str, train_x: torch.Tensor, train_y: torch.Tensor | None, num_classes: int
                    ) -> ScheduleCondition:
    """[learned] condition: "none", "class" (needs labelled data) or "stats:K" (2 <= K <= 64)."""
    kind, _, arg = spec.partition(":")
    if spec == "none":
        return ScheduleCondition("none")
    if spec == "class":
        if train_y is None or num_classes < 1:
            raise UsageError("[learned] condition = \"class\" needs a labelled dataset (digits, mnist5k, fashion-mnist, "
                             "cifar10, npz with y)")
        return ScheduleCondition("class", num_classes)
    if kind == "stats":
        try:
            k = int(arg)
        except ValueError:
            k = 0
        if not 2 <= k <= 64:
            raise UsageError(f"[learned] condition {spec!r}: use stats:K with K bins, 2 <= K <= 64")
        std = example_std(train_x)
        edges = torch.quantile(std.double(), torch.linspace(0, 1, k + 1, dtype=torch.float64)[1:-1]).float()
        return ScheduleCondition("stats", k, edges)
    raise UsageError(f"unknown [learned] condition {spec!r}; use none, class or stats:K")
