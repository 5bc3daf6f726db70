"""The start-up self-check: prove, before any worker starts, that the split reproduces the user's model family.

The stages redo the glue a family's own forward puts around its layers (glue.py). A family whose glue differs
would train a different function from the one lopt-dist exports, and nothing would say so. So before a run we
build a small random instance of the user's model class from the user's own config (fewer layers, narrower,
the same family options), cut it at the run's boundaries scaled to its depth, and compare in fp32 on a padded
batch: the composed stages' logits with the unsplit model's, the exported model (written by export_model and
reloaded with AutoModelForCausalLM) with the unsplit model, and, for MoE families, the router logits the
stages see with the ones the family records; with sequence packing (data.packing) also the stages' and the
family's own logits on the same sequences packed into shared rows (per-example position ids, no padding mask)
with the unpacked ones. Anything above the tolerance, or any failure to split, refuses the run with one line. The verdict is cached per (class, config, boundaries, versions, lopt-dist's model code),
so it costs seconds once.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.utils import logging as hf_logging

from lopt_dist.model.errors import ModelStructureError
from lopt_dist.model.export import export_model
from lopt_dist.model.glue import RouterLoss, _recordable
from lopt_dist.model.loading import cache_dir, load_model_config
from lopt_dist.model.parts import find_base
from lopt_dist.model.stages import Stage, resolve_boundaries, split_model

logger = logging.getLogger(__name__)

TOLERANCE = 1e-5  # absolute and relative, on fp32 logits
_SEQ, _VOCAB = 12, 128
_CHECK_ATTN = ("eager", "sdpa")  # kernels a CPU runs; others are checked with sdpa

# Width of the small instance; only attributes the config has are changed, family options are kept.
_NARROW = {
    "hidden_size": 64, "intermediate_size": 128, "intermediate_size_mlp": 128, "moe_intermediate_size": 64,
    "shared_expert_intermediate_size": 64, "num_attention_heads": 4, "head_dim": 16, "vocab_size": _VOCAB,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    # multi-head latent attention (DeepSeek): its head_dim is the rope part
    "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 16, "kv_lora_rank": 32, "q_lora_rank": 32,
}
_FEW = {"num_local_experts": 4, "num_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,  # at most
        "n_group": 2, "topk_group": 1}
_SHORT = {"sliding_window": 4, "attention_chunk_size": 4}  # shorter than the check's sequences, so they act
_INDEX_LISTS = ("mlp_only_layers", "moe_layers")  # config lists of layer indices (not one value per layer)


class FamilyCheckError(ModelStructureError):
    """The split cannot be proven to reproduce the user's model family."""


@dataclasses.dataclass
class Verdict:
    ok: bool
    family: str  # the *ForCausalLM class
    message: str  # the refusal (one line), or a summary of what was compared
    seconds: float
    cached: bool = False


def check_family(config: PretrainedConfig, boundaries: list[int], attn_implementation: str = "sdpa",
                 cache_root: Path | None = None, packed: bool = False) -> Verdict:
    """Check the split of `config`'s family at `boundaries` (full-model layer indices); raise if it is wrong.
    `packed`: check packed batches too (data.packing), which only the kernels the check runs may use.

    Raises ModelStructureError (the model's layout) or FamilyCheckError (the split differs); returns the
    verdict otherwise. `cache_root`: where verdicts are kept (default: lopt-dist's cache directory).
    """
    if packed and attn_implementation not in _CHECK_ATTN:
        raise FamilyCheckError(
            f"data.packing: model.attn_implementation={attn_implementation!r} is not one lopt-dist can verify packed "
            f"batches with (its kernels read packing from arguments the stages do not pass); use one of "
            f"{list(_CHECK_ATTN)}, or data.packing=false")
    attn = attn_implementation if attn_implementation in _CHECK_ATTN else "sdpa"
    path = _cache_path(config, boundaries, attn, cache_root, packed)
    verdict = _read_cached(path)
    if verdict is None:
        verdict = _run_check(config, boundaries, attn, packed)
        _write_cached(path, verdict)
    else:
        verdict.cached = True
    if not verdict.ok:
        raise FamilyCheckError(verdict.message)
    logger.info("model family self-check: %s (%s)", verdict.message,
                "cached verdict" if verdict.cached else f"{verdict.seconds:.2f} s")
    return verdict


# ------------------------------------------------------------------------------------------------- the check


def _run_check(config: PretrainedConfig, boundaries: list[int], attn: str, packed: bool = False) -> Verdict:
    start = time.perf_counter()
    family = f"{config.__class__.__name__.removesuffix('Config')} (model_type {config.model_type!r})"
    try:
        model, cuts = _small_model(config, boundaries, attn)
        family = f"{type(model).__name__} (model_type {config.model_type!r})"
        where = f"stages at layers {cuts} of {model.config.num_hidden_layers}"
        problems = _compare(model, cuts, attn)
        if packed:
            problems += _packing_problems(model, cuts)
    except ModelStructureError as err:  # the layout or the glue is refused, with its own message
        return Verdict(False, family, str(err), time.perf_counter() - start)
    except Exception as err:  # noqa: BLE001 - any failure to split is a refusal, named
        message = (f"{family}: the LoPT split fails on a small random instance of this config "
                   f"({type(err).__name__}: {_one_line(err)}); lopt-dist cannot train this family as it is. "
                   f"{_WHAT_TO_DO}")
        return Verdict(False, family, message, time.perf_counter() - start)
    seconds = time.perf_counter() - start
    if problems:
        message = (f"{family}: the LoPT split does not reproduce this family on a small random instance of its "
                   f"config (fp32, padded batch, {where}): {'; '.join(problems)}, so lopt-dist "
                   f"would train a different function from the one it exports. {_WHAT_TO_DO}")
        return Verdict(False, family, message, seconds)
    checked = "split, export and packed batches reproduce" if packed else "split and export reproduce"
    return Verdict(True, family, f"{family}: {checked} the model on a small instance ({where})",
                   seconds)


_WHAT_TO_DO = ("Use a family the README lists as verified, or train this one end to end (runtime.mode=local, "
               "train.method=e2e), and please report it")


def _small_model(config: PretrainedConfig, boundaries: list[int], attn: str):
    """A seeded random small instance of the user's *ForCausalLM class, and its stage boundaries."""
    name = config.__class__.__name__
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if model_class is None:
        raise FamilyCheckError(f"{name} (model_type {config.model_type!r}) has no causal-LM class in transformers "
                               f"{transformers.__version__}, so AutoModelForCausalLM cannot load it; LoPT trains "
                               "decoder-only causal LMs")
    if attn == "sdpa" and not model_class._supports_sdpa:
        raise FamilyCheckError(f"model.attn_implementation: {model_class.__name__} does not support 'sdpa' in "
                               f"transformers {transformers.__version__}; set model.attn_implementation=eager")
    try:
        small, cuts = small_config(config, boundaries)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(small, dtype=torch.float32, attn_implementation=attn).eval()
    except Exception as err:  # noqa: BLE001 - what cannot be built cannot be verified
        raise FamilyCheckError(
            f"{model_class.__name__} (model_type {config.model_type!r}): the self-check cannot build a small "
            f"instance of this config to verify the split ({type(err).__name__}: {_one_line(err)}), and lopt-dist "
            f"refuses what it cannot verify. {_WHAT_TO_DO}") from None
    _randomize(model)
    return model, cuts


def _compare(model, cuts: list[int], attn: str) -> list[str]:
    """What differs from the unsplit model, as phrases ('the composed stages' logits differ by 0.47')."""
    batch = _padded_batch()
    real = batch["attention_mask"].bool()
    stages = split_model(model, cuts, lambda_aux=1.0, seed=0)
    router = stages[0].glue.router_loss
    records_routers = "router_logits" in _recordable(find_base(model)[1]) or router is not None
    with torch.no_grad():
        kwargs = {"output_router_logits": True} if records_routers else {}
        want = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
        got, router_logits = _composed(stages, batch, router)
    problems = []
    diff = _excess(got[real], want.logits[real])
    if diff is not None:
        problems.append(f"the composed stages' logits differ from the unsplit model's by up to {diff:.3g} "
                        f"(tolerance {TOLERANCE:g})")
    if getattr(want, "aux_loss", None) is not None and router is None:
        problems.append("the family adds a router loss that the stages cannot reproduce")
    if router is not None:
        problems += _router_problems(router_logits, want.router_logits or ())
    with tempfile.TemporaryDirectory(prefix="lopt-selfcheck-") as tmp, _quiet_progress():
        out = export_model([s.hf_state_dict() for s in stages], model.config, None, Path(tmp) / "model")
        exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation=attn).eval()
        with torch.no_grad():
            reloaded = exported(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    diff = _excess(reloaded[real], want.logits[real])
    if diff is not None:
        problems.append(f"the exported model's logits differ from the unsplit model's by up to {diff:.3g} "
                        f"(tolerance {TOLERANCE:g})")
    return problems


def _packing_problems(model, cuts: list[int]) -> list[str]:
    """The stages (and the family's own forward, which e2e runs) on the check's sequences packed into two rows,
    against the unpacked unsplit model: per-example position ids must keep the examples apart exactly."""
    from lopt_dist.data.packing import collate_packed  # the data pipeline's own packing

    batch = _padded_batch()
    lengths = batch["attention_mask"].sum(-1).tolist()
    examples = [{"input_ids": batch["input_ids"][i, :n].tolist(), "labels": batch["input_ids"][i, :n].tolist()}
                for i, n in enumerate(lengths)]
    packed = collate_packed([[examples[0], examples[2]], [examples[1]]], pad_token_id=0)
    where = [(0, 0), (1, 0), (0, lengths[0])]  # (row, start) of each example in the packed rows
    stages = split_model(model, cuts, lambda_aux=1.0, seed=0, packed=True)
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        split, _ = _composed(stages, packed, None)
        own = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
    problems = []
    for name, got in (("the stages'", split), ("the family's own forward's", own)):
        worst = [d for i, (row, start) in enumerate(where)
                 if (d := _excess(got[row, start:start + lengths[i]], want[i, :lengths[i]])) is not None]
        if worst:
            problems.append(f"on packed sequences {name} logits differ from the unpacked model's by up to "
                            f"{max(worst):.3g} (tolerance {TOLERANCE:g}), so data.packing would let examples see "
                            "each other: set data.packing=false")
    return problems


def _composed(stages: list[Stage], batch: dict, router: RouterLoss | None):
    """The last stage's logits through every stage's own forward, and the router logits the stages saw."""
    seen: list[torch.Tensor] = []
    inputs = batch
    for stage in stages:
        with router.capture(stage.layers) if router else contextlib.nullcontext([]) as captured:
            if stage.is_last:
                hidden = stage.run_layers(inputs["hidden_states"], inputs["attention_mask"], inputs["position_ids"])
                logits = stage.logits(hidden)
            else:
                inputs = stage(inputs).boundary
        seen += captured
    return logits, seen


def _router_problems(seen: list[torch.Tensor], want: tuple) -> list[str]:
    if len(seen) != len(want):
        return [f"the stages see {len(seen)} routers where the family records {len(want)}"]
    worst = [d for a, b in zip(seen, want) if (d := _excess(a, b)) is not None]
    return [f"the stages' router logits differ by up to {max(worst):.3g} (tolerance {TOLERANCE:g})"] if worst else []


def _excess(got: torch.Tensor, want: torch.Tensor) -> float | None:
    """Largest absolute difference if any element is outside the tolerance, else None."""
    diff = (got.float() - want.float()).abs()
    if got.shape == want.shape and bool((diff <= TOLERANCE + TOLERANCE * want.float().abs()).all()):
        return None
    return float(diff.max()) if got.shape == want.shape else float("inf")


def _padded_batch() -> dict[str, torch.Tensor]:
    """Three sequences, two right-padded to different lengths, as the data pipeline pads them."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, _VOCAB, (3, _SEQ), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, _SEQ - 4:] = 0
    mask[2, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _randomize(model: torch.nn.Module) -> None:
    """Weights of unit-scale activations: a family's zero or constant initialisations would hide mistakes."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() >= 2:
                p.copy_(noise * p.shape[-1] ** -0.5)
            else:
                p.add_(noise * 0.1)


@contextlib.contextmanager
def _quiet_progress():
    """No save/load progress bars for a throw-away model in the middle of the start-up checks."""
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:297] + "..."


# ------------------------------------------------------------------------------------------ the small instance


def small_config(config: PretrainedConfig, boundaries: list[int]) -> tuple[PretrainedConfig, list[int]]:
    """A narrow copy of `config` with few layers, and the boundaries scaled to it.

    Each stage keeps its first and last layer (the pattern on both sides of every boundary) and the first layer
    of every other kind it has (attention type, rope or no rope, MoE or dense ...), so each stage's small copy
    meets every kind of layer the real one does.
    """
    depth = config.num_hidden_layers
    cuts = [0, *boundaries, depth]
    values = config.to_dict()
    per_layer = {k: v for k, v in values.items() if isinstance(v, list) and len(v) == depth and k not in _INDEX_LISTS}
    indexed = {k: set(v) for k, v in values.items() if k in _INDEX_LISTS and isinstance(v, list)}

    def kind(i: int) -> tuple:
        return tuple(str(v[i]) for v in per_layer.values()) + tuple(i in s for s in indexed.values())

    kept, small_cuts = [], []
    for a, b in zip(cuts, cuts[1:]):
        firsts = {kind(i): i for i in reversed(range(a, b))}  # first layer of each kind in [a, b)
        kept += sorted({a, b - 1, *firsts.values()})
        small_cuts.append(len(kept))
    small = copy.deepcopy(config)
    small.num_hidden_layers = len(kept)
    for key, value in per_layer.items():
        setattr(small, key, [value[i] for i in kept])
    for key, members in indexed.items():
        setattr(small, key, [n for n, i in enumerate(kept) if i in members])
    _narrow(small, config)
    return type(config).from_dict(small.to_dict()), small_cuts[:-1]


def _narrow(small: PretrainedConfig, config: PretrainedConfig) -> None:
    for key, value in _NARROW.items():
        if getattr(config, key, None) is not None:
            setattr(small, key, value)
    heads, kv = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    if kv is not None:  # keep multi-head, grouped or multi-query attention as it is
        small.num_key_value_heads = 4 if kv == heads else 1 if kv == 1 else 2
    for key, value in _FEW.items():
        if isinstance(getattr(config, key, None), int):
            setattr(small, key, min(getattr(config, key), value))
    for key, value in _SHORT.items():
        if getattr(config, key, None) is not None:
            setattr(small, key, value)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        token = getattr(config, key, None)
        if isinstance(token, int) and token >= _VOCAB or isinstance(token, list):
            setattr(small, key, 2)


# ------------------------------------------------------------------------------------------------- the cache


def _cache_path(config: PretrainedConfig, boundaries: list[int], attn: str, cache_root: Path | None,
                packed: bool = False) -> Path:
    values = {k: v for k, v in config.to_dict().items()
              if not k.startswith("_") and k not in ("transformers_version", "dtype", "torch_dtype")}
    key = json.dumps({
        "config_class": type(config).__name__, "config": values, "boundaries": list(boundaries), "attn": attn,
        **({"packed": True} if packed else {}),
        "transformers": transformers.__version__, "torch": torch.__version__, "code": _model_code_digest(),
    }, sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    return (cache_root or cache_dir()) / "selfcheck" / f"{digest}.json"


def _model_code_digest() -> str:
    """lopt-dist's own split, glue and export code: a change to it invalidates every cached verdict."""
    sha = hashlib.sha256()
    packing = Path(__file__).parents[1] / "data" / "packing.py"  # the packed batches the check builds
    for source in [*sorted(Path(__file__).parent.glob("*.py")), packing]:
        sha.update(source.read_bytes())
    return sha.hexdigest()


def _read_cached(path: Path) -> Verdict | None:
    try:
        return Verdict(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None  # absent or unreadable: check again


def _write_cached(path: Path, verdict: Verdict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as fh:
            json.dump(dataclasses.asdict(verdict), fh)
        os.replace(tmp, path)  # readers see the whole verdict or none
    except OSError as err:  # a read-only cache only costs the check again next time
        logger.warning("could not cache the model family self-check in %s: %s", path.parent, err)


# --------------------------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    """`python -m lopt_dist.model.selfcheck MODEL`: check a model family before a run, from its config alone."""
    parser = argparse.ArgumentParser(prog="python -m lopt_dist.model.selfcheck", description=main.__doc__)
    parser.add_argument("model", help="alias, checkpoint directory or hub id (as model.name)")
    parser.add_argument("--default-config", action="store_true",
                        help="MODEL is a transformers model_type: check that family's default config")
    parser.add_argument("--boundaries", type=int, nargs="+", help="as model.boundaries (default: the midpoint)")
    parser.add_argument("--attn", default="sdpa", help="as model.attn_implementation (default: sdpa)")
    parser.add_argument("--cache-dir", type=Path, help="where verdicts are kept (default: lopt-dist's cache)")
    args = parser.parse_args(argv)
    config = AutoConfig.for_model(args.model) if args.default_config else load_model_config(args.model)
    boundaries = resolve_boundaries(args.boundaries, config.num_hidden_layers)
    start = time.perf_counter()
    try:
        verdict = check_family(config, boundaries, args.attn, args.cache_dir)
    except ModelStructureError as err:
        print(f"refused: {err}")
        return 1
    print(f"{'cached' if verdict.cached else 'checked'} in {time.perf_counter() - start:.4f} s: {verdict.message}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
