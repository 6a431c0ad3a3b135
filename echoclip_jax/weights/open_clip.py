"""open_clip state dicts <-> our parameters, and open_clip's model config <-> our `config.model`.

Every parameter of our model has exactly one open_clip key; the mapping is derived from the parameter
path, and shapes are checked both ways so a mismatched architecture fails with the offending key.
Safetensors files are read with numpy (no PyTorch at run time); `.bin`/`.pt`/`.pth` need torch, which is
imported only for them. Files may be local or on a bucket (gs://): both readers take only local files, so
a bucket's file is copied to a temporary one (`storage.local_copy`) and a written one uploaded whole.
"""

from __future__ import annotations

import re

import ml_collections
import numpy as np
from safetensors.numpy import load_file, save_file

from echoclip_jax.config.defaults import get_base_config
from echoclip_jax.models.convnext import CONV_MLP_VARIANTS, CONVNEXT_VARIANTS
from echoclip_jax.models.vit import VIT_VARIANTS
from echoclip_jax.runtime import storage

# open_clip buffers / bookkeeping entries that carry no parameters of ours.
_IGNORED_KEYS = re.compile(r"(^|\.)(attn_mask|position_ids|num_batches_tracked)$")
_VIT_NAMES = {v: f"ViT-{v.replace('/', '-')}" for v in VIT_VARIANTS}


def _block_rule(rest: str):
    """Key suffix and transform for one transformer-block parameter (open_clip ResidualAttentionBlock)."""
    table = {
        "ln_1.scale": ("ln_1.weight", "copy"),
        "ln_1.bias": ("ln_1.bias", "copy"),
        "ln_2.scale": ("ln_2.weight", "copy"),
        "ln_2.bias": ("ln_2.bias", "copy"),
        "attn.qkv_kernel": ("attn.in_proj_weight", "qkv_w"),
        "attn.qkv_bias": ("attn.in_proj_bias", "flat"),
        "attn.out_kernel": ("attn.out_proj.weight", "out_w"),
        "attn.out_bias": ("attn.out_proj.bias", "copy"),
        "c_fc.kernel": ("mlp.c_fc.weight", "linear"),
        "c_fc.bias": ("mlp.c_fc.bias", "copy"),
        "c_proj.kernel": ("mlp.c_proj.weight", "linear"),
        "c_proj.bias": ("mlp.c_proj.bias", "copy"),
    }
    return table[rest]


def _norm(torch_name: str, leaf: str):
    return f"{torch_name}.{'weight' if leaf == 'scale' else 'bias'}"


def torch_key(path: tuple, conv_mlp: bool = False) -> tuple[str, str]:
    """Our parameter path -> (open_clip state-dict key, transform kind)."""
    p = ".".join(str(x) for x in path)
    if p in ("logit_scale", "logit_bias"):
        return p, "copy"
    m = re.fullmatch(r"text\.transformer\.resblocks\.(\d+)\.(.+)", p)
    if m:
        key, kind = _block_rule(m.group(2))
        return f"transformer.resblocks.{m.group(1)}.{key}", kind
    m = re.fullmatch(r"visual\.transformer\.resblocks\.(\d+)\.(.+)", p)
    if m:
        key, kind = _block_rule(m.group(2))
        return f"visual.transformer.resblocks.{m.group(1)}.{key}", kind
    simple = {
        "text.token_embedding": ("token_embedding.weight", "copy"),
        "text.positional_embedding": ("positional_embedding", "copy"),
        "text.text_projection": ("text_projection", "copy"),
        "visual.conv1.kernel": ("visual.conv1.weight", "conv"),
        "visual.class_embedding": ("visual.class_embedding", "copy"),
        "visual.positional_embedding": ("visual.positional_embedding", "copy"),
        "visual.proj": ("visual.proj", "copy"),
        "visual.stem_conv.kernel": ("visual.trunk.stem.0.weight", "conv"),
        "visual.stem_conv.bias": ("visual.trunk.stem.0.bias", "copy"),
        "visual.proj.kernel": ("visual.head.proj.weight", "linear"),
        "visual.mlp_fc1.kernel": ("visual.head.mlp.fc1.weight", "linear"),
        "visual.mlp_fc1.bias": ("visual.head.mlp.fc1.bias", "copy"),
        "visual.mlp_fc2.kernel": ("visual.head.mlp.fc2.weight", "linear"),
    }
    if p in simple:
        return simple[p]
    m = re.fullmatch(
        r"(text\.ln_final|visual\.ln_pre|visual\.ln_post|visual\.stem_norm|visual\.head_norm)"
        r"\.(scale|bias)",
        p,
    )
    if m:
        torch_name = {
            "text.ln_final": "ln_final",
            "visual.ln_pre": "visual.ln_pre",
            "visual.ln_post": "visual.ln_post",
            "visual.stem_norm": "visual.trunk.stem.1",
            "visual.head_norm": "visual.trunk.head.norm",
        }[m.group(1)]
        return _norm(torch_name, m.group(2)), "copy"
    m = re.fullmatch(r"visual\.stages\.(\d+)\.downsample_(norm|conv)\.(scale|bias|kernel)", p)
    if m:
        i, part, leaf = m.groups()
        if part == "norm":
            return _norm(f"visual.trunk.stages.{i}.downsample.0", leaf), "copy"
        return f"visual.trunk.stages.{i}.downsample.1.{'weight' if leaf == 'kernel' else 'bias'}", (
            "conv" if leaf == "kernel" else "copy"
        )
    m = re.fullmatch(r"visual\.stages\.(\d+)\.blocks\.(\d+)\.(.+)", p)
    if m:
        i, j, rest = m.groups()
        prefix = f"visual.trunk.stages.{i}.blocks.{j}."
        linear = "linear_conv1x1" if conv_mlp else "linear"
        table = {
            "conv_dw.kernel": ("conv_dw.weight", "dwconv"),
            "conv_dw.bias": ("conv_dw.bias", "copy"),
            "norm.scale": ("norm.weight", "copy"),
            "norm.bias": ("norm.bias", "copy"),
            "fc1.kernel": ("mlp.fc1.weight", linear),
            "fc1.bias": ("mlp.fc1.bias", "copy"),
            "fc2.kernel": ("mlp.fc2.weight", linear),
            "fc2.bias": ("mlp.fc2.bias", "copy"),
            "gamma": ("gamma", "copy"),
        }
        key, kind = table[rest]
        return prefix + key, kind
    raise KeyError(f"parameter {p} has no open_clip counterpart")


def to_torch_layout(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "copy":
        return x
    if kind == "flat":
        return x.reshape(-1)
    if kind == "linear":
        return x.T
    if kind == "linear_conv1x1":
        return x.T[:, :, None, None]
    if kind == "conv":  # [k, k, in, out] -> [out, in, k, k]
        return x.transpose(3, 2, 0, 1)
    if kind == "dwconv":  # [k, k, C] -> [C, 1, k, k]
        return x.transpose(2, 0, 1)[:, None]
    if kind == "qkv_w":  # [W, 3, H, D] -> [3W, W]
        return x.reshape(x.shape[0], -1).T
    if kind == "out_w":  # [H, D, W] -> [W, W]
        return x.reshape(-1, x.shape[-1]).T
    raise ValueError(kind)


def from_torch_layout(x: np.ndarray, kind: str, shape: tuple) -> np.ndarray:
    if kind in ("copy", "flat"):
        return x.reshape(shape)
    if kind == "linear":
        return x.T
    if kind == "linear_conv1x1":
        return x[:, :, 0, 0].T
    if kind == "conv":
        return x.transpose(2, 3, 1, 0)
    if kind == "dwconv":
        return x[:, 0].transpose(1, 2, 0)
    if kind in ("qkv_w", "out_w"):
        return x.T.reshape(shape)
    raise ValueError(kind)


def _conv_mlp(model_config) -> bool:
    return model_config.vision.kind == "convnext" and model_config.vision.variant in CONV_MLP_VARIANTS


def export_state_dict(flat_params: dict, model_config) -> dict[str, np.ndarray]:
    """Our flat params {path tuple: array} -> open_clip state dict {key: numpy array}."""
    if model_config.temporal_pool != "mean":
        raise ValueError("open_clip has no temporal pooling head: export a model with temporal_pool='mean'")
    conv_mlp = _conv_mlp(model_config)
    out = {}
    for path, value in flat_params.items():
        key, kind = torch_key(path, conv_mlp)
        out[key] = np.array(to_torch_layout(np.asarray(value), kind), order="C")  # keeps 0-d as 0-d
    return out


def import_state_dict(state_dict: dict, expected: dict, model_config, source: str) -> dict:
    """open_clip state dict -> our flat params, shaped and typed like `expected` {path: ShapeDtypeStruct}.

    Raises ValueError naming `source` and every missing, unexpected or mis-shaped key.
    """
    conv_mlp = _conv_mlp(model_config)
    sd = _strip_prefixes(state_dict)
    params, problems, used = {}, [], set()
    for path, spec in expected.items():
        key, kind = torch_key(path, conv_mlp)
        if key not in sd:
            problems.append(f"missing {key}")
            continue
        used.add(key)
        value = np.asarray(sd[key])
        want = to_torch_layout(np.zeros(spec.shape, np.float32), kind).shape
        if value.shape != want:
            problems.append(f"{key}: shape {value.shape}, the config needs {want}")
            continue
        params[path] = from_torch_layout(value, kind, tuple(spec.shape)).astype(spec.dtype)
    extra = sorted(k for k in sd if k not in used and not _IGNORED_KEYS.search(k))
    problems += [f"unexpected {k}" for k in extra]
    if problems:
        shown = "; ".join(problems[:12]) + (f"; ... {len(problems) - 12} more" if len(problems) > 12 else "")
        raise ValueError(f"{source}: state dict does not match the model config: {shown}")
    return params


def _strip_prefixes(sd: dict) -> dict:
    """Unwraps training checkpoints ({'state_dict': ...}) and DDP's 'module.' prefix."""
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads a .safetensors file with numpy, or a PyTorch .bin/.pt/.pth (needs torch) into numpy arrays
    (local or gs://)."""
    if not storage.path(path).is_file():
        raise FileNotFoundError(f"{path}: state dict file not found")
    if path.endswith(".safetensors"):
        with storage.local_copy(path) as local:
            try:
                return load_file(local)
            except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
                raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    try:
        import torch  # noqa: PLC0415 (optional: the interop extra)
    except ImportError as e:
        raise ImportError(
            f"{path}: reading PyTorch checkpoints needs torch (the `interop` extra); or convert it to .safetensors"
        ) from e
    with storage.local_copy(path) as local:
        try:
            sd = torch.load(local, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: not a readable PyTorch checkpoint ({e})") from e
    sd = _strip_prefixes(sd)
    return {
        k: (v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()) for k, v in sd.items() if hasattr(v, "numpy")
    }


def write_state_dict(state_dict: dict[str, np.ndarray], path: str) -> None:
    """Writes `path` (local or gs://) whole: .safetensors with numpy, anything else with torch.save."""
    with storage.local_output(path) as local:
        if path.endswith(".safetensors"):
            save_file({k: np.array(v, order="C") for k, v in state_dict.items()}, local)
            return
        import torch  # noqa: PLC0415 (optional: the interop extra)

        torch.save({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, local)


def open_clip_model_cfg(model_config) -> dict:
    """Our `config.model` -> open_clip `model_cfg` (the dict open_clip's factory builds CLIP from)."""
    mc, vc, tc = model_config, model_config.vision, model_config.text
    if vc.kind == "convnext":
        vision = {
            "timm_model_name": f"convnext_{vc.variant}",
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": vc.head,
            "timm_drop": 0.0,
            "timm_drop_path": vc.drop_path_rate,
            "image_size": vc.image_size,
        }
    else:
        width, layers, heads, patch = VIT_VARIANTS[vc.variant]
        vision = {
            "image_size": vc.image_size,
            "layers": layers,
            "width": width,
            "head_width": width // heads,
            "patch_size": patch,
        }
    text = {
        "context_length": tc.context_length,
        "vocab_size": tc.vocab_size,
        "width": tc.width,
        "heads": tc.heads,
        "layers": tc.layers,
    }
    if tc.pool == "eos":
        text.update(pool_type="eos", eos_id=tc.eos_id)
    cfg = {"embed_dim": mc.embed_dim, "vision_cfg": vision, "text_cfg": text}
    if mc.init_logit_bias is not None:
        cfg["init_logit_bias"] = mc.init_logit_bias
    return cfg


def model_config_from_open_clip(cfg: dict, base=None, source: str = "open_clip config"):
    """open_clip `model_cfg` -> our `config.model` (starting from `base`, e.g. a config file's model)."""
    cfg = cfg.get("model_cfg", cfg)
    mc = ml_collections.ConfigDict((base or get_base_config().model).to_dict())
    try:
        vision, text = cfg["vision_cfg"], cfg["text_cfg"]
        mc.embed_dim = cfg["embed_dim"]
        if "timm_model_name" in vision:
            name = vision["timm_model_name"]
            variant = name.removeprefix("convnext_")
            if not name.startswith("convnext_") or variant not in CONVNEXT_VARIANTS:
                raise ValueError(f"timm model {name!r} is not a supported ConvNeXt")
            if vision.get("timm_pool", "") not in ("", "avg") or vision.get("timm_proj", "linear") not in (
                "linear",
                "mlp",
            ):
                raise ValueError("only timm_pool ''/'avg' with a linear or mlp projection are supported")
            mc.vision.kind, mc.vision.variant = "convnext", variant
            mc.vision.head = vision.get("timm_proj", "linear")
            mc.vision.drop_path_rate = vision.get("timm_drop_path") or 0.0
        else:
            width, patch = vision["width"], vision["patch_size"]
            heads = width // vision.get("head_width", 64)
            match = [k for k, v in VIT_VARIANTS.items() if v == (width, vision["layers"], heads, patch)]
            if not match:
                raise ValueError(f"ViT (width {width}, layers {vision['layers']}, patch {patch}) is not supported")
            mc.vision.kind, mc.vision.variant, mc.vision.head = "vit", match[0], "linear"
        mc.vision.image_size = vision.get("image_size", 224)
        mc.text.context_length = text.get("context_length", 77)
        mc.text.vocab_size = text.get("vocab_size", 49408)
        mc.text.width, mc.text.heads, mc.text.layers = text["width"], text["heads"], text["layers"]
        mc.text.pool = text.get("pool_type", "argmax")
        if mc.text.pool == "eos":
            mc.text.eos_id = text.get("eos_id", 2)
        mc.init_logit_bias = cfg.get("init_logit_bias")
        mc.temporal_pool = "mean"
    except KeyError as e:
        raise ValueError(f"{source}: missing field {e}") from e
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e
    return mc


def write_open_clip_dir(flat_params: dict, model_config, out_dir: str) -> str:
    """Writes `out_dir/open_clip_config.json` + `open_clip_model.safetensors` (open_clip 'local-dir:' layout;
    `out_dir` local or gs://, where open_clip itself cannot read it: copy it down first)."""
    sd = export_state_dict(flat_params, model_config)
    write_state_dict(sd, storage.join(out_dir, "open_clip_model.safetensors"))
    config = {
        "model_cfg": open_clip_model_cfg(model_config),
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
    }
    storage.dump_json(storage.join(out_dir, "open_clip_config.json"), config, indent=2)
    return out_dir
