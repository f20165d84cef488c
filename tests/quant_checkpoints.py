"""Tiny pre-quantized FP8 checkpoints for tests, and the oracle logits for them.

Not a test file: tests import it (`from tests import quant_checkpoints`). On 2 CPU cores
each checkpoint takes about 1-3 s and each `reference_logits` call about 0.3 s.

* `tiny_llama(dir)`: a random float32 LlamaForCausalLM (hidden 64, intermediate 128, 2 layers,
  4 heads, 2 KV heads, head_dim 16, vocab 256), safetensors + config.json, no tokenizer.
* `compressed_tensors_fp8(src, dest, scheme, kv_cache)`: what llm-compressor writes, made by
  `llmcompressor.oneshot` itself (compressed-tensors "float-quantized" format):
  - "FP8_DYNAMIC": weight F8_E4M3 + weight_scale F32 [out, 1] (per output channel); inputs
    quantized per token at run time (no input_scale);
  - "FP8": weight F8_E4M3 + weight_scale F32 [1], input_scale F32 [1] (calibration max / 448);
  - kv_cache=True: `kv_cache_scheme` + `self_attn.k_scale` / `self_attn.v_scale` F32 [1].
* `modelopt_fp8(src, dest, kv_cache)`: NVIDIA Model Optimizer's unified HF export for
  `quant_algo: FP8`, written by hand (modelopt needs CUDA): weight F8_E4M3, weight_scale and
  input_scale 0-d F32; KV variants `self_attn.k_proj.k_scale` / `self_attn.v_proj.v_scale`
  0-d F32 (or none, for `fp8_cast`); hf_quant_config.json, and (unless config_style="legacy")
  config.json `quantization_config` with `quant_method: modelopt`.
* `reference_logits(path, input_ids)`: the oracle -- transformers for compressed-tensors,
  `fp8_emulation_model` for modelopt (transformers cannot load it); see its docstring.

In every fixture lm_head, embeddings and norms stay float32, and all scales are amax / 448
(448 = largest finite float8_e4m3fn), dequantization being w_fp8 * scale.

`compressed_tensors_fp8` needs llmcompressor, compressed-tensors and datasets (tests:
`pytest.importorskip("llmcompressor")`); everything else needs only torch, safetensors,
tokenizers and transformers.
"""

from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_DTYPE = torch.float8_e4m3fn

# Same shapes as tests/conftest.py's TINY: head_dim 16, GQA 4:2, every GEMM dim a multiple of 16.
TINY_LLAMA = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, initializer_range=0.1,
    rms_norm_eps=1e-6, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
    tie_word_embeddings=False,
)

CT_SCHEMES = ("FP8_DYNAMIC", "FP8")
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def calibration_ids(num: int = 4, seq_len: int = 32, vocab_size: int = 256,
                    seed: int = 1234) -> torch.Tensor:
    """[num, seq_len] int64 random token ids: the calibration set of every fixture here."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num, seq_len), generator=g, dtype=torch.long)


def tiny_llama(dir, seed: int = 0, **overrides) -> Path:
    """Save a tiny random float32 LlamaForCausalLM (safetensors + config.json) into `dir`."""
    import transformers

    dir = Path(dir)
    config = transformers.LlamaConfig(**{**TINY_LLAMA, **overrides})
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(dir)
    return dir


def tiny_tokenizer(vocab_size: int = 256):
    """A word-level fast tokenizer over tokens "t0".."t{vocab_size-1}", built in memory (no
    downloads). llm-compressor's `oneshot` insists on a processor whenever a dataset is
    given, even an already tokenized one; this is all it gets."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1",
                                   eos_token="t2", pad_token="t0")


def _load_float(src, attn: str = "eager"):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        src, dtype=torch.float32, attn_implementation=attn)
    return model.eval()


def _vocab(src) -> int:
    return json.loads((Path(src) / "config.json").read_text())["vocab_size"]


# ----------------------------------------------------------------------------------------------
# compressed-tensors (llm-compressor)
# ----------------------------------------------------------------------------------------------

def ct_kv_cache_supported() -> bool:
    """Whether compressed-tensors can hook the KV cache of this transformers' Llama.

    compressed-tensors (0.19 and 0.20 alike) recognises an attention module, and swaps its
    quantizing cache in, only through a `past_key_values` / `past_key_value` forward kwarg.
    transformers 5.24 renamed it `cache`, so there llm-compressor silently writes no k/v scales
    (`kv_cache_scheme: null`), and transformers, loading a checkpoint that has them, silently
    leaves the KV cache unquantized. (transformers <= 5.23 still uses `past_key_values`.)
    """
    from transformers.models.llama.modeling_llama import LlamaAttention

    params = inspect.signature(LlamaAttention.forward).parameters
    return "past_key_values" in params or "past_key_value" in params


def compressed_tensors_fp8(src, dest, scheme: str = "FP8_DYNAMIC", kv_cache: bool = False,
                           num_samples: int = 4, seq_len: int = 32,
                           ignore: tuple[str, ...] = ("lm_head",)) -> Path:
    """Quantize the float checkpoint `src` with llm-compressor's `oneshot` into `dest`.

    scheme: "FP8_DYNAMIC" or "FP8" (llm-compressor preset names); kv_cache adds a static
    per-tensor FP8 `kv_cache_scheme` (as in llm-compressor's KV-cache example). lm_head is
    ignored (stays float). Calibration runs `num_samples` random sequences through the
    "basic" pipeline (one full forward each): input_scale = running max|x| / 448; k/v scales
    from llm-compressor's default "minmax" observer, a moving average (constant 0.01) of
    per-sequence min/max of the post-RoPE keys / values. `ignore`: llm-compressor's ignore
    list (MoE models add their router, "re:.*mlp.gate$"). On transformers >= 5.24, where
    llm-compressor cannot calibrate the KV cache, the k/v scales and `kv_cache_scheme` are
    added by `_add_ct_kv_scales` in exactly llm-compressor's layout.
    """
    if scheme not in CT_SCHEMES:
        raise ValueError(f"scheme must be one of {CT_SCHEMES}, got {scheme!r}")
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    dest = Path(dest)
    model = _load_float(src, attn="eager")
    kv_scheme = None
    if kv_cache:
        kv_scheme = dict(num_bits=8, type="float", strategy="tensor", dynamic=False,
                         symmetric=True)
    recipe = QuantizationModifier(targets=["Linear"], scheme=scheme, ignore=list(ignore),
                                  kv_cache_scheme=kv_scheme)
    ids = calibration_ids(num_samples, seq_len, _vocab(src))
    dataset = Dataset.from_dict({"input_ids": ids.tolist(),
                                 "attention_mask": torch.ones_like(ids).tolist()})
    oneshot(model=model, processor=tiny_tokenizer(_vocab(src)), recipe=recipe, dataset=dataset,
            num_calibration_samples=num_samples, max_seq_length=seq_len,
            shuffle_calibration_samples=False, pipeline="basic")
    with warnings.catch_warnings():  # llm-compressor's CPU "offload" wrapper; nothing to act on
        warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded")
        model.save_pretrained(dest, save_compressed=True)
    if kv_cache and not ct_kv_cache_supported():
        _add_ct_kv_scales(src, dest, kv_scheme, ids)
    return dest


def _add_ct_kv_scales(src, dest: Path, kv_scheme: dict, ids: torch.Tensor) -> None:
    """Fallback for transformers >= 5.24 (see `ct_kv_cache_supported`): add by hand what
    llm-compressor would have written -- `self_attn.k_scale` / `v_scale` F32 [1] and the
    `kv_cache_scheme` block -- with scales = calibration max |post-RoPE key| resp. |value|
    of the float model / 448 (llm-compressor itself uses a moving-average min/max)."""
    from compressed_tensors.quantization import QuantizationArgs
    from safetensors import safe_open
    from safetensors.torch import save_file

    amax = _calibrate_amax(_load_float(src), ids, kv_cache=True)
    (file,) = sorted(dest.glob("*.safetensors"))
    with safe_open(str(file), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for key in [k for k in amax if k.endswith((".k", ".v"))]:
        tensors[f"{key}_scale"] = _scale(amax[key]).reshape(1)
    save_file(tensors, str(file), metadata=metadata)
    config = json.loads((dest / "config.json").read_text())
    config["quantization_config"]["kv_cache_scheme"] = \
        QuantizationArgs(**kv_scheme).model_dump(mode="json")
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


# ----------------------------------------------------------------------------------------------
# NVIDIA Model Optimizer unified HF export, FP8
# ----------------------------------------------------------------------------------------------

def _kv_heads_post_rope(attn, hidden_states, position_embeddings):
    """Key states (post-RoPE, [B, kv_heads, S, D]) and value states as Llama attention
    hands them to the attention function -- what modelopt's k/v_bmm_quantizer observe."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    shape = (*hidden_states.shape[:-1], -1, attn.head_dim)
    q = attn.q_proj(hidden_states).view(shape).transpose(1, 2)
    k = attn.k_proj(hidden_states).view(shape).transpose(1, 2)
    v = attn.v_proj(hidden_states).view(shape).transpose(1, 2)
    cos, sin = position_embeddings
    _, k = apply_rotary_pos_emb(q, k, cos, sin)
    return k, v


@torch.no_grad()
def _calibrate_amax(model, ids: torch.Tensor, kv_cache: bool) -> dict[str, float]:
    """Max |x| of every decoder nn.Linear input ('<name>.input'); with kv_cache also of the
    post-RoPE keys ('<attn>.k') and values ('<attn>.v') of every attention module."""
    amax: dict[str, float] = {}
    hooks = []

    def record(key, t):
        amax[key] = max(amax.get(key, 0.0), t.detach().abs().max().item())

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in LINEAR_NAMES:
            hooks.append(mod.register_forward_pre_hook(
                lambda m, args, key=f"{name}.input": record(key, args[0])))
        if kv_cache and name.endswith("self_attn"):
            def attn_hook(m, args, kwargs, key=name):
                hs = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                k, v = _kv_heads_post_rope(m, hs, kwargs["position_embeddings"])
                record(f"{key}.k", k)
                record(f"{key}.v", v)
            hooks.append(mod.register_forward_pre_hook(attn_hook, with_kwargs=True))
    try:
        for row in ids:
            model(row[None], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return amax


def _scale(amax: float) -> torch.Tensor:
    """0-d F32 amax / 448, divided in float32 like modelopt's activation and KV scales
    (`amax.float() / maxbound`)."""
    return torch.tensor(amax, dtype=torch.float32) / FP8_MAX


def _weight_scale(w: torch.Tensor) -> torch.Tensor:
    """0-d F32 max|W| / 448 as modelopt's FP8 export computes it:
    `torch.tensor(amax.item() / maxbound)` (a float64 division, then float32)."""
    return torch.tensor(w.abs().max().item() / FP8_MAX, dtype=torch.float32)


MODELOPT_KV_MODES = ("fp8", "fp8_clamped", "fp8_cast")


def modelopt_fp8(src, dest, kv_cache: bool | str = False, num_samples: int = 4,
                 seq_len: int = 32, config_style: str = "current",
                 modelopt_version: str = "0.43.0") -> Path:
    """Write `src` as NVIDIA Model Optimizer's unified HF checkpoint for quant_algo FP8.

    Per decoder nn.Linear (q/k/v/o/gate/up/down): `weight` F8_E4M3 = (W / weight_scale) cast,
    `weight_scale` 0-d F32 = max|W| / 448 (one per module: modelopt's HF export does not
    unify q/k/v or gate/up scales for FP8), `input_scale` 0-d F32 = calibration max|x| / 448.
    lm_head, embeddings and norms stay float32; lm_head is listed in `exclude_modules`.

    kv_cache (`kv_cache_quant_algo: FP8`; True means "fp8"):
      "fp8": `self_attn.k_proj.k_scale` / `self_attn.v_proj.v_scale`, 0-d F32 = max over the
        calibration of |post-RoPE key| resp. |value| (as handed to the attention function,
        before the GQA repeat) / 448 -- modelopt >= 0.43 with `--kv_cache_qformat fp8`;
      "fp8_clamped": the same, clamped to >= 1.0 -- every modelopt < 0.43 calibrated export
        (so published FP8-KV checkpoints mostly carry k_scale = v_scale = 1.0);
      "fp8_cast": no k/v scale tensors at all (constant amax 448, i.e. scale 1.0, not
        stored) -- modelopt >= 0.43's default `--kv_cache_qformat fp8_cast`.

    config_style "current" (modelopt >= 0.33): hf_quant_config.json AND config.json
    `quantization_config` (compressed-tensors-like, quant_method "modelopt"); "legacy"
    (modelopt < 0.31): hf_quant_config.json only, config.json without quantization_config.
    """
    if config_style not in ("current", "legacy"):
        raise ValueError(f"config_style must be 'current' or 'legacy', got {config_style!r}")
    from safetensors.torch import save_file

    kv_mode = "fp8" if kv_cache is True else (kv_cache or None)
    if kv_mode not in (None, *MODELOPT_KV_MODES):
        raise ValueError(f"kv_cache must be a bool or one of {MODELOPT_KV_MODES}")
    src, dest = Path(src), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    model = _load_float(src, attn="eager")
    amax = _calibrate_amax(model, calibration_ids(num_samples, seq_len, _vocab(src)),
                           kv_mode in ("fp8", "fp8_clamped"))

    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        mod_name, _, leaf = key.rpartition(".")
        if leaf == "weight" and mod_name.split(".")[-1] in LINEAR_NAMES:
            w_scale = _weight_scale(t)
            out[key] = (t / w_scale).to(FP8_DTYPE)
            out[f"{mod_name}.weight_scale"] = w_scale
            out[f"{mod_name}.input_scale"] = _scale(amax[f"{mod_name}.input"])
        else:
            out[key] = t
    if kv_mode in ("fp8", "fp8_clamped"):
        for name, _ in model.named_modules():
            if name.endswith("self_attn"):
                for kv, proj in (("k", "k_proj"), ("v", "v_proj")):
                    scale = _scale(amax[f"{name}.{kv}"])
                    if kv_mode == "fp8_clamped":
                        scale = scale.clamp(min=1.0)
                    out[f"{name}.{proj}.{kv}_scale"] = scale
    save_file(out, str(dest / "model.safetensors"), metadata={"format": "pt"})

    hf_quant_config = {
        "producer": {"name": "modelopt", "version": modelopt_version},
        "quantization": {
            "quant_algo": "FP8",
            "kv_cache_quant_algo": "FP8" if kv_mode else None,
            "exclude_modules": ["lm_head"],
        },
    }
    (dest / "hf_quant_config.json").write_text(json.dumps(hf_quant_config, indent=4))

    config = json.loads((src / "config.json").read_text())
    if config_style == "current":
        qc = {
            "config_groups": {"group_0": {
                "input_activations": {"dynamic": False, "num_bits": 8, "type": "float"},
                "weights": {"dynamic": False, "num_bits": 8, "type": "float"},
                "targets": ["Linear"],
            }},
            "ignore": ["lm_head"],
            "quant_algo": "FP8",
        }
        if kv_mode:
            qc["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
        qc["producer"] = hf_quant_config["producer"]
        qc["quant_method"] = "modelopt"
        config["quantization_config"] = qc
    (dest / "config.json").write_text(json.dumps(config, indent=4))
    gen = src / "generation_config.json"
    if gen.exists():
        (dest / "generation_config.json").write_text(gen.read_text())
    return dest


# ----------------------------------------------------------------------------------------------
# Oracle
# ----------------------------------------------------------------------------------------------

def _quant_config(path: Path) -> tuple[str | None, dict]:
    """('compressed-tensors' | 'modelopt' | None, the config that says so).

    config.json `quantization_config` wins; modelopt 0.31-0.32 wrote one without
    `quant_method` (recognised by its `producer`), modelopt < 0.31 only hf_quant_config.json."""
    cfg = json.loads((path / "config.json").read_text()).get("quantization_config")
    hqc = path / "hf_quant_config.json"
    if cfg is not None:
        method = cfg.get("quant_method")
        if method is None and (hqc.exists() or
                               (cfg.get("producer") or {}).get("name") == "modelopt"):
            method = "modelopt"
        return method, cfg
    if hqc.exists():
        return "modelopt", json.loads(hqc.read_text())
    return None, {}


def fake_quant(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """clamp(x / scale, +-448) -> float8_e4m3fn (round to nearest even) -> * scale, in x's
    dtype. `scale` broadcasts (0-d for per-tensor)."""
    q = (x.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return (q.float() * scale.float()).to(x.dtype)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _dynamic_token_inputs(method: str | None, qcfg: dict) -> bool:
    """True when the checkpoint's linear inputs are quantized dynamically per token
    (compressed-tensors FP8_DYNAMIC); False for static per-tensor input_scale."""
    if method != "compressed-tensors":
        return False
    for group in qcfg.get("config_groups", {}).values():
        act = group.get("input_activations") or {}
        if act.get("dynamic") is True and act.get("strategy") == "token":
            return True
    return False


def _fp8_kv_cache(qcfg: dict) -> bool:
    """Whether the quantization config (config.json `quantization_config` of either format, or
    a legacy hf_quant_config.json) declares an FP8 KV cache."""
    scheme = qcfg.get("kv_cache_scheme")
    if isinstance(scheme, dict):
        return scheme.get("type") == "float" and scheme.get("num_bits") == 8
    algo = scheme or qcfg.get("kv_cache_quant_algo") or \
        (qcfg.get("quantization") or {}).get("kv_cache_quant_algo")
    return str(algo).upper() == "FP8"


def fp8_emulation_model(path, quantize_inputs: bool = True, quantize_kv: bool = True):
    """A transformers float32 Llama that emulates an FP8 checkpoint of either format.

    * weights: w_fp8.float() * weight_scale (0-d, [1] or [out, 1] broadcast);
    * every quantized linear's input (quantize_inputs): fake_quant with its static
      `input_scale`, or, for compressed-tensors dynamic per-token schemes, with
      scale = max|x| over the hidden dim / 448 per token;
    * quantize_kv (if the checkpoint has k/v scales: CT `self_attn.k_scale`/`v_scale` or
      modelopt `self_attn.k_proj.k_scale`/`v_proj.v_scale`): post-RoPE keys and values
      fake-quantized per tensor where they enter attention (before the GQA repeat); a
      config that declares an FP8 KV cache without any k/v scale tensors (modelopt
      `fp8_cast`) gets scale 1.0;
    Everything else (norms, embeddings, lm_head, softmax) is plain float32 eager transformers.
    """
    import transformers

    path = Path(path)
    method, qcfg = _quant_config(path)
    dynamic = _dynamic_token_inputs(method, qcfg)
    sd = _load_tensors(path)
    config = transformers.AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, attn_implementation="eager").eval()

    float_sd, input_scales, kv_scales, quantized = {}, {}, {}, []
    for key, t in sd.items():
        if key.endswith((".weight_scale", ".weight_zero_point", ".input_zero_point")):
            continue
        if key.endswith(".input_scale"):
            input_scales[key.removesuffix(".input_scale")] = t.float()
        elif key.endswith((".self_attn.k_scale", ".self_attn.v_scale",
                           ".self_attn.k_proj.k_scale", ".self_attn.v_proj.v_scale")):
            attn_name = key[: key.index(".self_attn.") + len(".self_attn")]
            kv_scales.setdefault(attn_name, {})[key[-7]] = t.float()  # 'k' or 'v'
        elif t.dtype == FP8_DTYPE:
            mod = key.removesuffix(".weight")
            float_sd[key] = t.float() * sd[f"{mod}.weight_scale"].float()
            quantized.append(mod)
        else:
            float_sd[key] = t.float()
    missing, unexpected = model.load_state_dict(float_sd, strict=False)
    if unexpected or missing:
        raise ValueError(f"checkpoint does not fit the model: {missing[:3]} {unexpected[:3]}")

    if quantize_inputs:
        for name, mod in model.named_modules():
            if name not in quantized:
                continue
            if name in input_scales:
                scale = input_scales[name]
                mod.register_forward_pre_hook(
                    lambda m, args, s=scale: (fake_quant(args[0], s), *args[1:]))
            elif dynamic:
                mod.register_forward_pre_hook(
                    lambda m, args: (fake_quant(args[0], _token_scale(args[0])), *args[1:]))

    if quantize_kv and not kv_scales and _fp8_kv_cache(qcfg):
        one = torch.tensor(1.0)
        kv_scales = {name: {"k": one, "v": one} for name, _ in model.named_modules()
                     if name.endswith(".self_attn")}
    if quantize_kv and kv_scales:
        for name, mod in model.named_modules():
            if name in kv_scales:
                mod._fp8_kv_scales = kv_scales[name]
        from transformers.masking_utils import AttentionMaskInterface, eager_mask

        # A new attention implementation name needs its mask function too (else no causal mask).
        transformers.AttentionInterface.register("fp8_kv_eager", _fp8_kv_eager_attention)
        AttentionMaskInterface.register("fp8_kv_eager", eager_mask)
        model.set_attn_implementation("fp8_kv_eager")
    return model


def _token_scale(x: torch.Tensor) -> torch.Tensor:
    amax = x.detach().float().abs().amax(dim=-1, keepdim=True)
    scale = amax / FP8_MAX
    return torch.where(scale == 0, torch.finfo(torch.float32).eps, scale)


def _fp8_kv_eager_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' eager attention with per-tensor FP8 fake quantization of the (post-RoPE)
    key and value states it receives."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    s = getattr(module, "_fp8_kv_scales", None)
    if s is not None:
        key, value = fake_quant(key, s["k"]), fake_quant(value, s["v"])
    return eager_attention_forward(module, query, key, value, attention_mask, **kwargs)


@torch.no_grad()
def reference_logits(path, input_ids: torch.Tensor) -> torch.Tensor:
    """Float32 logits [B, S, vocab] for the checkpoint at `path` on `input_ids` ([B, S] or
    [S]): one full forward, eager attention, no cache carried between calls.

    * compressed-tensors: transformers' own `AutoModelForCausalLM.from_pretrained` (its
      compressed-tensors integration) on the CPU. What it runs (checked bit for bit against
      `fp8_emulation_model`): weights w_fp8 * weight_scale in float32, every quantized
      linear's input fake-quantized (FP8: static per tensor with input_scale; FP8_DYNAMIC:
      per token, max|x| / 448), and with a kv_cache_scheme the post-RoPE keys and the values
      fake-quantized per tensor with k_scale / v_scale as they enter the cache. On
      transformers >= 5.24 compressed-tensors cannot hook the KV cache (see
      `ct_kv_cache_supported`); KV checkpoints then fall back to `fp8_emulation_model`, with
      a warning.
    * modelopt: transformers has no modelopt loader (it warns "Unknown quantization type",
      loads the raw FP8 codes as float weights and drops the scales), so
      `fp8_emulation_model` stands in: the same numerics as above, static input scales.
    * anything else: plain transformers float32.
    """
    import transformers

    path = Path(path)
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    method, qcfg = _quant_config(path)
    if method == "modelopt":
        model = fp8_emulation_model(path)
    elif method == "compressed-tensors" and _fp8_kv_cache(qcfg) and not ct_kv_cache_supported():
        warnings.warn("this transformers leaves a compressed-tensors KV cache unquantized; "
                      "using fp8_emulation_model (bit-identical to transformers 5.17 + "
                      "compressed-tensors 0.19)",
                      stacklevel=3)
        model = fp8_emulation_model(path)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation="eager").eval()
    logits = model(ids, use_cache=False).logits.float()
    return logits if input_ids.dim() == 2 else logits[0]


def compressed_tensors_int_weights(src, dest, num_bits: int = 4, symmetric: bool = True,
                                   group_size: int = 32, num_samples: int = 4,
                                   seq_len: int = 32) -> Path:
    """W4A16 / W8A16 with llm-compressor's GPTQModifier (`oneshot`, "basic" pipeline,
    random calibration ids): compressed-tensors "pack-quantized" (weight_packed int32,
    weight_scale, weight_shape, and weight_zero_point when asymmetric); lm_head float."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    dest = Path(dest)
    model = _load_float(src, attn="eager")
    weights = dict(num_bits=num_bits, type="int", symmetric=symmetric, strategy="group",
                   group_size=group_size)
    recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                          ignore=["lm_head"])
    ids = calibration_ids(num_samples, seq_len, _vocab(src))
    dataset = Dataset.from_dict({"input_ids": ids.tolist(),
                                 "attention_mask": torch.ones_like(ids).tolist()})
    oneshot(model=model, processor=tiny_tokenizer(_vocab(src)), recipe=recipe, dataset=dataset,
            num_calibration_samples=num_samples, max_seq_length=seq_len,
            shuffle_calibration_samples=False, pipeline="basic")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded")
        model.save_pretrained(dest, save_compressed=True)
    return dest


def compressed_tensors_w8a8(src, dest, num_samples: int = 4, seq_len: int = 32) -> Path:
    """llm-compressor's "W8A8" preset (QuantizationModifier): compressed-tensors
    "int-quantized", int8 weights with per-channel weight_scale [out, 1], inputs
    quantized per token at run time; lm_head float."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    dest = Path(dest)
    model = _load_float(src, attn="eager")
    recipe = QuantizationModifier(targets=["Linear"], scheme="W8A8", ignore=["lm_head"])
    ids = calibration_ids(num_samples, seq_len, _vocab(src))
    dataset = Dataset.from_dict({"input_ids": ids.tolist(),
                                 "attention_mask": torch.ones_like(ids).tolist()})
    oneshot(model=model, processor=tiny_tokenizer(_vocab(src)), recipe=recipe, dataset=dataset,
            num_calibration_samples=num_samples, max_seq_length=seq_len,
            shuffle_calibration_samples=False, pipeline="basic")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded")
        model.save_pretrained(dest, save_compressed=True)
    return dest
