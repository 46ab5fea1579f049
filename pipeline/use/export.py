"""`isoflop export`: a trained model as a self-contained folder that other tools load.

Both families are written with Hugging Face Llama's tensor names in `model.safetensors`, beside a
`config.json` and the run's tokenizer as a `PreTrainedTokenizerFast` (`tokenizer.json` and
`tokenizer_config.json`), which puts EOS before a text as isoflop's prompts do (training data starts every
document with EOS):

- an ARM is a `LlamaForCausalLM` folder: transformers' `AutoModelForCausalLM.from_pretrained` loads it;
- an MDM attends both ways and reads a mask token, which no transformers class does: its config.json has
  the same architecture fields plus `mask_token_id` and `is_causal: false`, under a model_type of its own so
  that transformers refuses it instead of running it as a causal model; isoflop loads it (`load_export`).

The "isoflop" block of config.json (family, tokenizer, the run's result.json) is how isoflop reads either
folder back, so `isoflop sample` and `score` take an export as `--checkpoint`. Writing needs no transformers.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.data.tokenizer import Tokenizer
from pipeline.errors import ExportError, RunFolderError
from pipeline.model.family import FAMILIES
from pipeline.model.shapes import Shape
from pipeline.model.transformer import ModelConfig, Transformer
from pipeline.training.run_folder import TrainedModel

CONFIG, WEIGHTS, TOKENIZER, TOKENIZER_CONFIG = "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"
MASK = "<|mask|>"  # the MDM's mask token in its exported tokenizer
QKV = ("q_proj", "k_proj", "v_proj")


@dataclass(frozen=True)
class Exported:
    path: Path
    loads_with: str  # how a user loads it, for the command's message


def export(trained: TrainedModel, out: str | Path, tokenizer: Tokenizer, overwrite: bool = False) -> Exported:
    """Write `out` (built beside it, then renamed, so a folder that exists is complete)."""
    out = Path(out)
    check_out(out, overwrite)
    config = trained.model.config
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        save_file(to_llama(trained.model.state_dict(), config.shape.n_layer), staging / WEIGHTS,
                  metadata={"format": "pt"})  # transformers reads only safetensors files that say they hold torch tensors
        (staging / CONFIG).write_text(json.dumps(model_config_json(trained, tokenizer), indent=2))
        write_tokenizer(tokenizer, staging, config)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if config.llama_compatible:
        return Exported(out, "a Hugging Face LlamaForCausalLM: AutoModelForCausalLM.from_pretrained and "
                             "AutoTokenizer.from_pretrained load it")
    return Exported(out, f"an {trained.family!r} (bidirectional attention, mask token id {config.mask_token_id}) "
                         f"that isoflop loads: isoflop sample --checkpoint {out} ...")


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse to write over anything but an empty folder or, with overwrite, an earlier export."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not is_export(out):
        raise ExportError(f"--out: {out} exists and is not an empty folder; refusing to write there")
    if not overwrite:
        raise ExportError(f"--out: {out} already holds an export; pass --overwrite to replace it")


# ------------------------------------------------------------------------------------- tensor names

def _renames(n_layer: int) -> list[tuple[str, str]]:
    """(isoflop name, Llama name) of every tensor but the fused attention input, which splits into q, k, v."""
    pairs = [("embed.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight"),
             ("head.weight", "lm_head.weight")]
    for i in range(n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        pairs += [(ours + a, theirs + b) for a, b in (
            ("attn_norm.weight", "input_layernorm.weight"), ("attn.proj.weight", "self_attn.o_proj.weight"),
            ("mlp_norm.weight", "post_attention_layernorm.weight"), ("mlp.gate.weight", "mlp.gate_proj.weight"),
            ("mlp.up.weight", "mlp.up_proj.weight"), ("mlp.down.weight", "mlp.down_proj.weight"))]
    return pairs


def to_llama(state: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    """Our state dict in Llama's names. The fused qkv rows are q, k, v in turn, each head after head as in
    Llama's projections, and both models rotate the two halves of each head: a split is all it takes."""
    out = {theirs: state[ours] for ours, theirs in _renames(n_layer)}
    for i in range(n_layer):
        for name, rows in zip(QKV, state[f"blocks.{i}.attn.qkv.weight"].chunk(3)):
            out[f"model.layers.{i}.self_attn.{name}.weight"] = rows.clone()  # older safetensors refuse shared storage
    return {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in out.items()}


def from_llama(tensors: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    state = {ours: tensors[theirs] for ours, theirs in _renames(n_layer)}
    for i in range(n_layer):
        state[f"blocks.{i}.attn.qkv.weight"] = torch.cat([tensors[f"model.layers.{i}.self_attn.{name}.weight"]
                                                          for name in QKV])
    return state


# ------------------------------------------------------------------------------------- config and tokenizer

def model_config_json(trained: TrainedModel, tokenizer: Tokenizer) -> dict:
    """Llama's config fields for either family; the MDM's adds its mask token and a model_type of its own."""
    model, config = trained.model, trained.model.config
    shape = config.shape
    fields = {
        "architectures": ["LlamaForCausalLM"] if config.llama_compatible else ["IsoflopMaskedDiffusion"],
        "model_type": "llama" if config.llama_compatible else "isoflop_mdm",
        "vocab_size": config.vocab_size, "hidden_size": shape.d_model, "intermediate_size": shape.d_ff,
        "num_hidden_layers": shape.n_layer, "num_attention_heads": shape.n_head,
        "num_key_value_heads": shape.n_head, "head_dim": shape.head_size, "hidden_act": "silu",
        "max_position_embeddings": config.seq_len, "rms_norm_eps": model.norm.eps,
        "rope_theta": config.rope_base, "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_base},
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
        "bos_token_id": tokenizer.eos_id, "eos_token_id": tokenizer.eos_id, "dtype": "float32",
    }
    if not config.llama_compatible:
        fields |= config.attention_fields()
    tokenizer_fields = {"kind": tokenizer.kind, "name": tokenizer.name, "vocab_size": tokenizer.vocab_size,
                        "eos_id": tokenizer.eos_id}
    return {**fields, "isoflop": {"family": trained.family.name, "tokenizer": tokenizer_fields,
                                  "exported_from": trained.source, "run": trained.description}}


def write_tokenizer(tokenizer: Tokenizer, folder: Path, config: ModelConfig) -> None:
    from tokenizers import processors

    hf = tokenizer.as_hf()
    eos = hf.id_to_token(tokenizer.eos_id)
    hf.post_processor = processors.TemplateProcessing(  # EOS first: training data puts it before every document
        single=f"{eos} $A", pair=f"{eos} $A {eos} $B", special_tokens=[(eos, tokenizer.eos_id)])
    special = {"bos_token": eos, "eos_token": eos}
    if config.mask_token and hf.get_vocab_size() == config.mask_token_id:  # the next id is the mask's
        hf.add_special_tokens([MASK])
        special["mask_token"] = MASK
    hf.save(str(folder / TOKENIZER))
    (folder / TOKENIZER_CONFIG).write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", **special, "model_max_length": config.seq_len,
        "clean_up_tokenization_spaces": False}, indent=2))


# ------------------------------------------------------------------------------------- reading back

def is_export(folder: str | Path) -> bool:
    """Whether `folder` is one `export` wrote (its config.json has the isoflop block)."""
    try:
        return "isoflop" in json.loads((Path(folder) / CONFIG).read_text())
    except (OSError, ValueError, TypeError):
        return False


def load_export(folder: str | Path, device: str | torch.device = "cpu") -> TrainedModel:
    """An exported folder as isoflop's own model, with the tokenizer it carries."""
    folder = Path(folder)
    try:
        config = json.loads((folder / CONFIG).read_text())
        meta = config["isoflop"]
        family = FAMILIES[meta["family"]]
        shape = Shape(config["num_hidden_layers"], config["num_attention_heads"], config["hidden_size"],
                      config["intermediate_size"], name=meta["run"]["result"]["model"])
        model_config = replace(family.model_config(shape, config["vocab_size"], config["max_position_embeddings"]),
                               rope_base=float(config["rope_theta"]))
        if config.get("mask_token_id") != model_config.mask_token_id:
            raise ValueError(f"mask_token_id {config.get('mask_token_id')} but an {family!r} of vocab "
                             f"{model_config.vocab_size} has {model_config.mask_token_id}")
        tok = meta["tokenizer"]
        tokenizer = (Tokenizer.from_file(folder / TOKENIZER, vocab_size=tok["vocab_size"], eos_id=tok["eos_id"],
                                         name=tok["name"]) if tok["kind"] == "hf"
                     else Tokenizer(tok["kind"], tok["vocab_size"], tok["eos_id"], name=tok["name"]))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise RunFolderError(f"checkpoint: {folder / CONFIG}: unreadable ({type(err).__name__}: {err})") from None
    model = Transformer(model_config)
    try:
        model.load_state_dict(from_llama(load_file(folder / WEIGHTS), shape.n_layer))
    except (KeyError, RuntimeError, OSError, SafetensorError) as err:
        raise RunFolderError(f"checkpoint: {folder / WEIGHTS} does not fit {CONFIG}'s model: "
                             f"{type(err).__name__}: {str(err).splitlines()[0]}") from None
    description = meta["run"]
    return TrainedModel(model.to(device).eval(), family, Path(description["data"]), description, str(folder), tokenizer)
