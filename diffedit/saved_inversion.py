"""A DiffEdit inversion saved to disk, so that one encoding serves any number of later edits.

The file is safetensors: `latents` (T, C, h, w), every inverted level, noisiest first; `timesteps` (T,), the level
of each; `clean` (C, h, w), the image latents the encoding started from. Its string metadata says what the latents
are compatible with: the model (its path or repo id and a fingerprint of its files), the step count, the encoding
ratio, the inversion's guidance scale, the image's size and working size, the prompt, the seed, the mode and the
LoRA adapters (`lora`: each active one's file digest and weight; absent in older files: none) and the learned
words (`embeddings`: each textual-inversion word, its id count and a digest of its vectors; absent: none) and
the picture (`image_digest`: `picture_digest` of the RGB picture that was inverted; absent in older files, which
load but cannot be checked against a picture) (`format` "diffedit-latents", `version` "1"). Files written by
`diffedit invert` since version 0.1.0 have this layout and load here.

`read_inversion_metadata` is torch-free and cheap (the command line checks a file before it loads anything);
`load_inversion` checks the tensors and, given a model, that they come from it.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from .outputs import Planned, commit
from .validation import FileError, check_readable, one_line

FORMAT = "diffedit-latents"
VERSION = "1"


class InversionFileError(FileError):
    """A saved inversion that cannot be used (not one, damaged, from another version or model), with the file
    named."""


def model_fingerprint(folder: Path, configs: str = "") -> str:
    """A cheap identity of a model folder: its configs and, for each weight file, its size and first and last
    64 KiB. Equal for a moved or copied model, different for retrained weights. A single-file checkpoint: the same
    of its one file, plus `configs`, the configs it was loaded with (the file holds none)."""
    h = hashlib.sha256()
    path = Path(folder)
    if path.is_file():
        _hash_weights(h, path, "single-file")
        h.update(configs.encode())
        return h.hexdigest()[:16]
    for f in sorted(path.glob("*/*")):
        if f.name.endswith(".json") and f.parent.name != "tokenizer":
            h.update(f"{f.parent.name}/{f.name}".encode())
            h.update(f.read_bytes())
        elif f.suffix == ".safetensors":
            _hash_weights(h, f, f"{f.parent.name}/{f.name}")
    return h.hexdigest()[:16]


def _hash_weights(h, f: Path, label: str) -> None:
    """A weight file's label, size, first and last 64 KiB."""
    size = f.stat().st_size
    h.update(f"{label}:{size}".encode())
    with open(f, "rb") as fh:
        h.update(fh.read(65536))
        fh.seek(max(0, size - 65536))
        h.update(fh.read(65536))


def fingerprint_of(model) -> str:
    """`model_fingerprint` of a loaded StableDiffusion: its folder, or its single file with the configs, tokenizer
    padding and schedules it was built with (another --config or prediction_type gives other latents)."""
    configs = "" if model.folder.is_dir() else repr((
        model.unet.config, model.vae.config, model.text_encoder.config, model.scheduler.config,
        model.inverse_scheduler.config, model.tokenizer.pad_token_id, model.tokenizer.model_max_length))
    return model_fingerprint(model.folder, configs)


def read_inversion_metadata(path: Path) -> dict:
    """The metadata of a saved inversion, checked, with `steps`, `width`, `height` as ints and `strength`,
    `guidance` as floats. Reads only the file's header."""
    path = Path(path)
    check_readable(path, "latents file", InversionFileError)
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            meta, keys = f.metadata() or {}, set(f.keys())
    except Exception as e:  # noqa: BLE001 - SafetensorError and friends: not a safetensors file, or truncated
        raise InversionFileError(f"latents file {path} is not a safetensors file or is corrupt "
                                 f"({one_line(e)})") from None
    if meta.get("format") != FORMAT or not {"latents", "timesteps", "clean"} <= keys:
        raise InversionFileError(f"{path} is not a latents file written by `diffedit invert`")
    if meta.get("version") != VERSION:
        raise InversionFileError(f"latents file {path} has version {meta.get('version')}; this diffedit reads "
                                 f"version {VERSION} (invert again)")
    try:
        for key in ("steps", "width", "height"):
            meta[key] = int(meta[key])
        meta["strength"], meta["guidance"] = float(meta["strength"]), float(meta["guidance"])
        meta["lora_scale"] = float(meta.get("lora_scale", 1.0))  # files from before --lora-scale: 1
    except (KeyError, ValueError) as e:
        raise InversionFileError(f"latents file {path} has damaged metadata ({e}): invert again") from None
    for key, valid in _METADATA_RANGES.items():
        if not valid(meta[key]):
            raise InversionFileError(f"latents file {path} has damaged metadata ({key}={meta[key]}): invert again")
    return meta


# What each number of the metadata may hold; anything else (NaN, inf, out of range) is a damaged file.
_METADATA_RANGES = {
    "steps": lambda v: v >= 1, "width": lambda v: v >= 1, "height": lambda v: v >= 1,
    "strength": lambda v: 0 < v <= 1,  # NaN fails every comparison
    "guidance": lambda v: math.isfinite(v) and v >= 0,
    "lora_scale": math.isfinite,
}


def picture_digest(picture) -> str:
    """A digest of a picture's pixels as the commands read them (a PIL image: mode, size and bytes): what a saved
    inversion records, so that `edit --latents` refuses another picture. Torch-free."""
    h = hashlib.sha256(f"{picture.mode}:{picture.width}x{picture.height}:".encode())
    h.update(picture.tobytes())
    return h.hexdigest()[:32]


def check_picture(meta: dict, picture, path: Path) -> bool:
    """Refuse a saved inversion (its metadata `meta`) of another picture than `picture` (a PIL image read as the
    commands read it). False when the file records no picture (written before the record existed): unchecked."""
    recorded = meta.get("image_digest")
    if not recorded:
        return False
    if recorded != picture_digest(picture):
        raise InversionFileError(f"{path} was inverted from another picture; invert this one")
    return True


def recorded_model(sd) -> str:
    """How a file names the model: the absolute folder (or single file) when it was loaded from one, else its repo
    id."""
    local = Path(sd.source).expanduser()
    return str(local.resolve()) if sd.source and local.exists() else sd.source


def inversion_metadata(inversion, *, model, params, image_size: tuple[int, int], prompt: str | None = None,
                       seed: int | None = None, picture=None) -> dict:
    """What a saved inversion records (all strings once written). `model` is the StableDiffusion that inverted,
    `params` the DiffEditParams, `image_size` the input image's (width, height), `picture` (optional) the PIL image
    that was inverted, recorded as its `picture_digest`."""
    from . import __version__
    from .params import CORRECTIONS

    if model.folder is None:
        raise ValueError("model: an inversion is saved with the model folder or file it came from; load the model "
                         "with StableDiffusion.from_pretrained or from_single_file")
    corrections = {getattr(params, name) for name in CORRECTIONS.values()}
    mode = "corrected" if corrections == {True} else "reference" if corrections == {False} else "mixed"
    h, w = inversion.latents.shape[-2:]
    f = model.vae_scale_factor
    return {"format": FORMAT, "version": VERSION, "model": recorded_model(model),
            "model_fingerprint": fingerprint_of(model), "steps": params.num_inference_steps,
            "strength": params.inpaint_strength, "width": image_size[0], "height": image_size[1],
            "working_width": w * f, "working_height": h * f, "prompt": "" if prompt is None else prompt,
            "guidance": params.inversion_guidance_scale, "seed": "" if seed is None else seed, "mode": mode,
            "sampler": params.sampler, "lora": lora_record(model), "lora_scale": params.lora_scale,
            "embeddings": embeddings_record(model),
            **({} if picture is None else {"image_digest": picture_digest(picture)}),
            "diffedit_version": __version__}


def lora_record(model) -> str:
    """The model's LoRA adapters as a saved inversion records them: JSON [[file digest, weight], ...] ("[]": none)."""
    return json.dumps(model.lora.record())


def embeddings_record(model) -> str:
    """The model's learned words as a saved inversion records them: JSON [[word, ids, vectors' digest], ...] in id
    order ("[]": none). The digest is of the float32 rows, so a word of the same name with other vectors differs."""
    words, embeddings = model.tokenizer.added_words, model.text_encoder.embeddings
    if not words:
        return "[]"
    rows, record, start = embeddings.added_rows.float().cpu(), [], 0
    for word, n in words:
        digest = hashlib.sha256(rows[start:start + n].contiguous().numpy().tobytes()).hexdigest()[:16]
        record.append([word, n, digest])
        start += n
    assert start == len(rows), "every added row belongs to one word"
    return json.dumps(record)


def inversion_writer(inversion, metadata: dict):
    """A `Planned.write` that saves one image's inversion (batch row 0) with `metadata`."""
    from safetensors.torch import save_file

    tensors = {"latents": inversion.latents[0].float().cpu().contiguous(),  # (T, C, h, w)
               "timesteps": inversion.timesteps.cpu().contiguous(),  # (T,)
               "clean": inversion.clean[0].float().cpu().contiguous()}  # (C, h, w)
    strings = {k: str(v) for k, v in metadata.items()}
    return lambda tmp: save_file(tensors, str(tmp), metadata=strings)


def save_inversion(path: Path, inversion, *, model, params, image_size: tuple[int, int], prompt: str | None = None,
                   seed: int | None = None, picture=None) -> dict:
    """Save the inversion of one image (`method.invert`'s result) to `path` (.safetensors), written to a
    temporary file and renamed, so an existing file is replaced whole or not at all. Returns the metadata. With
    `picture` (the PIL image inverted) the file records its digest, which `check_picture` compares."""
    path = Path(path)
    if inversion.latents.shape[0] != 1:
        raise ValueError(f"inversion: a file holds one image's inversion, got a batch of "
                         f"{inversion.latents.shape[0]}")
    meta = inversion_metadata(inversion, model=model, params=params, image_size=image_size, prompt=prompt,
                              seed=seed, picture=picture)
    commit([Planned(path, "latents file", inversion_writer(inversion, meta))])
    return meta


def load_inversion(path: Path, model=None):
    """A saved inversion -> (method.Inversion with a batch of one, metadata). With a model (a StableDiffusion
    loaded from a folder) the file must come from that model (same fingerprint) and the tensors go to its device
    and dtype; without one they stay float32 on the CPU."""
    import torch
    from safetensors.torch import load_file

    from .method import Inversion

    path = Path(path)
    meta = read_inversion_metadata(path)
    if model is not None and model.folder is not None:
        if meta.get("model_fingerprint") != fingerprint_of(model):
            raise InversionFileError(f"{path} was inverted with another model ({meta.get('model')}) than "
                                     f"{model.source}: load that model or invert again")
    if model is not None:  # files from before LoRA support were inverted without adapters
        recorded, current = meta.get("lora", "[]"), lora_record(model)
        if recorded != current:
            raise InversionFileError(f"{path} was inverted with LoRA adapters {recorded} (file digest, weight) but "
                                     f"the model now has {current}: load the same LoRA files with the same weights "
                                     "(--lora FILE:WEIGHT) or invert again")
        recorded, current = meta.get("embeddings", "[]"), embeddings_record(model)
        if recorded != current:
            raise InversionFileError(f"{path} was inverted with learned words {recorded} (word, ids, digest) but "
                                     f"the model now has {current}: load the same embeddings (--embedding "
                                     "FILE[:TOKEN]) or invert again")
    try:
        t = load_file(str(path))
    except Exception as e:  # noqa: BLE001
        raise InversionFileError(f"latents file {path} is truncated or corrupt ({one_line(e)})") from None
    latents, timesteps, clean = t["latents"], t["timesteps"], t["clean"]
    if latents.ndim != 4 or clean.shape != latents.shape[1:] or timesteps.shape != latents.shape[:1]:
        raise InversionFileError(f"latents file {path} holds tensors of unexpected shapes")
    expected = int(meta["steps"] * meta["strength"])
    if len(timesteps) != expected or not bool((timesteps[:-1] > timesteps[1:]).all()):
        raise InversionFileError(f"latents file {path} holds {len(timesteps)} levels but its metadata says "
                                 f"steps {meta['steps']} x strength {meta['strength']:g} = {expected}, noisiest "
                                 "first: the file and its metadata disagree (invert again)")
    if not latents.is_floating_point() or not clean.is_floating_point():
        raise InversionFileError(f"latents file {path} holds tensors of unexpected types (invert again)")
    if not all(bool(torch.isfinite(t).all()) for t in (latents, clean)):
        raise InversionFileError(f"latents file {path} holds non-finite values (NaN or inf): it is damaged; "
                                 "invert again")
    if model is not None:
        f, (h, w) = model.vae_scale_factor, latents.shape[-2:]
        if latents.shape[1] != model.vae.config.latent_channels:
            raise InversionFileError(f"latents file {path} has {latents.shape[1]} latent channels but the model's "
                                     f"VAE has {model.vae.config.latent_channels}")
        if (meta.get("working_width"), meta.get("working_height")) not in ((None, None), (str(w * f), str(h * f))):
            raise InversionFileError(f"latents file {path} holds {w}x{h} latents ({w * f}x{h * f} pixels) but its "
                                     f"metadata says {meta.get('working_width')}x{meta.get('working_height')}")
        if int(timesteps.max()) >= model.scheduler.config.num_train_timesteps or int(timesteps.min()) < 0:
            raise InversionFileError(f"latents file {path} holds levels outside the model's schedule")
    device, dtype = (model.device, model.dtype) if model is not None else (torch.device("cpu"), torch.float32)
    inversion = Inversion(latents[None].to(device, dtype), timesteps.long(), clean[None].to(device, dtype))
    return inversion, meta
