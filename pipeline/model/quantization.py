"""Helpers for loading and training on bitsandbytes-quantised base models.

Two things here are easy to get wrong:

* A 4-bit model cannot be built with ``from_config(quantization_config=...)``;
  quantisation only happens on the ``from_pretrained`` path. Save the base
  model to a folder first, then load it with :func:`bnb_config`.
* On CPUs with AVX512-bf16, bitsandbytes silently breaks LoRA gradients after
  any eval-mode forward (evaluation loop, ``generate``). :func:`guard_cpu_4bit`
  prevents it; ``pipeline.model.loading.load_model`` calls it on every 4-bit load, so
  training, ``pipeline.evaluate``, the server and export all get it.

torch, transformers and bitsandbytes are imported inside the functions: the model loader imports
this module, and composing a config must not pay for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn
    from transformers import BitsAndBytesConfig

_INSTALL_HINT = "bitsandbytes is required for quantised loading: pip install bitsandbytes"

_4BIT_QUANT_TYPES = ("nf4", "fp4")


def _import_bnb() -> Any:
    """Import bitsandbytes on demand.

    Kept lazy so the rest of the pipeline works on machines without it.

    Returns:
        The ``bitsandbytes`` module.

    Raises:
        ImportError: If bitsandbytes is not installed.
    """
    try:
        import bitsandbytes  # lazy: loads torch and its native library; only for a quantised base
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    return bitsandbytes


def _torch_dtype(name: str) -> torch.dtype:
    """Turn a dtype name such as ``"bfloat16"`` into a ``torch.dtype``.

    Args:
        name: Attribute name on the ``torch`` module.

    Returns:
        The matching dtype.

    Raises:
        ValueError: If ``name`` is not a torch dtype.
    """
    import torch  # lazy: start-up must not pay for torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch dtype: {name!r}")
    return dtype


def bnb_config(
    bits: int,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: str = "bfloat16",
    quant_storage: str | None = None,
) -> BitsAndBytesConfig:
    """Build a ``BitsAndBytesConfig`` for 4-bit or 8-bit loading.

    Pass the result to ``AutoModelForCausalLM.from_pretrained(folder,
    quantization_config=...)``; ``from_config`` ignores it.

    Args:
        bits: 4 or 8.
        quant_type: 4-bit data type, ``"nf4"`` or ``"fp4"``.
        double_quant: Also quantise the per-block scales (4-bit only).
        compute_dtype: Dtype the 4-bit matmuls run in, e.g. ``"bfloat16"``.
        quant_storage: Optional dtype name the packed 4-bit weights are
            stored as (``bnb_4bit_quant_storage``); FSDP needs it to match
            the dtype of the unquantised parameters.

    Returns:
        The quantisation config.

    Raises:
        ValueError: If ``bits`` or ``quant_type`` is unsupported.
        ImportError: If bitsandbytes is not installed.
    """
    # Fail here rather than deep inside from_pretrained.
    _import_bnb()
    from transformers import BitsAndBytesConfig  # lazy: transformers loads torch

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    if bits != 4:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if quant_type not in _4BIT_QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {_4BIT_QUANT_TYPES}, got {quant_type!r}")
    kwargs: dict[str, Any] = {}
    if quant_storage is not None:
        kwargs["bnb_4bit_quant_storage"] = _torch_dtype(quant_storage)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=_torch_dtype(compute_dtype),
        **kwargs,
    )


def linear4bit_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """List the ``bnb.nn.Linear4bit`` modules of a model.

    Args:
        model: Any module tree, possibly wrapped by PEFT.

    Returns:
        ``(qualified_name, module)`` pairs in ``named_modules`` order.
    """
    bnb = _import_bnb()
    return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, bnb.nn.Linear4bit)]


def guard_cpu_4bit(model: nn.Module) -> int:
    """Keep bitsandbytes off its inference-only CPU path so LoRA grads stay right.

    ``bnb.nn.Linear4bit.__init__`` sets ``support_avx512bf16_for_cpu =
    has_avx512bf16()``. When that flag is true and a forward runs on CPU with
    the module in eval mode and an input that does not require grad (any
    evaluation loop or ``generate``), ``Linear4bit.forward`` permanently
    repacks ``weight.data`` into an AVX512-bf16 tile layout and marks the
    quant state ``packing_format_for_cpu``. From then on ``matmul_4bit``
    routes every CPU call, training included, to ``gemv_4bit``, which has no
    autograd formula, so no gradient flows back through any frozen 4-bit weight.
    LoRA weights whose output reaches the loss only through such a weight (the
    attention projections, through ``o_proj``) get no gradient at all; others
    (an MLP ``down_proj``, through the residual stream) get one that misses the
    later layers' share, i.e. a wrong one. Only a warning from torch says so.
    Clearing the flag keeps the weight in the standard layout, whose matmul has
    a backward; it also keeps inference in the compute dtype (the repacked
    kernel computes in bf16), so a model answers the same in training's
    evaluation, ``pipeline.evaluate`` and the server, on any CPU.

    Only weights on CPU are affected; on GPU the flag is never read, so
    calling this unconditionally is harmless. Call it after loading (and
    after PEFT wrapping is fine too) but before any eval-mode forward: a
    weight that has already been repacked stays repacked.

    Args:
        model: Model loaded with a 4-bit ``BitsAndBytesConfig``.

    Returns:
        Number of ``Linear4bit`` modules patched.
    """
    modules = linear4bit_modules(model)
    for _, mod in modules:
        mod.support_avx512bf16_for_cpu = False
    return len(modules)


def dequantized_state_dict(model: nn.Module, dtype: Any = None) -> dict[str, torch.Tensor]:
    """Dequantise every 4-bit linear weight of a model.

    Useful to build a full-precision twin of a quantised model, e.g. to check
    gradients or to merge adapters into a dense copy.

    Args:
        model: Model loaded with a 4-bit ``BitsAndBytesConfig``.
        dtype: Dtype of the returned tensors (default ``torch.float32``).

    Returns:
        Map from ``"<module name>.weight"`` to the dense weight of shape
        ``(out_features, in_features)``.

    Raises:
        RuntimeError: If a weight is in bitsandbytes' CPU inference layout,
            which ``dequantize_4bit`` cannot read.
    """
    import torch  # lazy: start-up must not pay for torch

    bnb = _import_bnb()
    dtype = torch.float32 if dtype is None else dtype
    out: dict[str, torch.Tensor] = {}
    for name, mod in linear4bit_modules(model):
        state = mod.weight.quant_state
        # The repacked AVX512 layout is not what dequantize_4bit expects.
        if getattr(state, "packing_format_for_cpu", False):
            raise RuntimeError(f"{name} was repacked for CPU inference; call guard_cpu_4bit before eval")
        dense = bnb.functional.dequantize_4bit(mod.weight.data, state)
        out[f"{name}.weight"] = dense.to(dtype).detach().clone()
    return out
