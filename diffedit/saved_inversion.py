"""A DiffEdit inversion saved to disk, so that one encoding serves any number of later edits.

The file is safetensors: `latents` (T, C, h, w), every inverted level, noisiest first; `timesteps` (T,), the level
of each; `clean` (C, h, w), the image latents the encoding started from. Its string metadata says what the latents
are compatible with: the model (its path or repo id and a fingerprint of its files), the step count, the encoding
ratio, the inversion's guidance scale, the image's size and working size, the prompt, the seed, the mode and the
LoRA adapters (`lora`: each active one's file digest and weight; absent in older files: none) and the learned
words (`embeddings`: each textual-inversion word, its id count and a digest of its vectors; absent: none) and
the picture (`image_digest`: `picture_digest` of the RGB picture that was inverted; absent in older files, which
load but cannot be checked against a picture), the tokenizer (`tokenizer`: `tokenizer_record`, which the model
fingerprint leaves out; absent in older files: unchecked) and the dtype the inversion ran in (`dtype`, a record
only: a float16 inversion decodes in float32 too) (`format` "diffedit-latents", `version` "1"). Files written by
`diffedit invert` since version 0.1.0 have this layout and load here.

`read_inversion_metadata` is torch-free and cheap (the command line checks a file before it loads anything);
`load_inversion` checks the tensors and, given a model, that they come from it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

from .outputs import OutputPathError, Planned, check_outputs, commit
from .validation import FileError, check_readable, is_integral, one_line

FORMAT = "diffedit-latents"
VERSION = "1"


class InversionFileError(FileError):
    """A saved inversion that cannot be used (not one, damaged, from another version or model), with the file
    named."""


class InversionPathError(FileError, OutputPathError):
    """Where `save_inversion` cannot write (a folder, a missing or read-only folder, a file of the model): the
    package's file error and the command line's output-path error at once, with the path named."""


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
    from .params import SAMPLERS

    if meta.get("sampler", "ddim") not in SAMPLERS:  # files from before the sampler was recorded: DDIM
        raise InversionFileError(f"latents file {path} was inverted with sampler {meta['sampler']!r}, which this "
                                 f"diffedit does not know (it runs {', '.join(SAMPLERS)}): invert again with one of "
                                 "them, or use the diffedit that wrote it")
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
            "embeddings": embeddings_record(model), "tokenizer": tokenizer_record(model),
            "dtype": str(model.dtype).removeprefix("torch."),
            **({} if picture is None else {"image_digest": picture_digest(picture)}),
            "diffedit_version": __version__}


def tokenizer_record(model) -> str:
    """A digest of the tokenizer a saved inversion's prompt went through: the files of a model folder's tokenizer/
    (vocabulary, merges, special tokens, padding), which `model_fingerprint` leaves out, and its padding token and
    length. Another padding token alone moves every text state. A single file's tokenizer comes from its configs,
    whose padding its fingerprint holds: its digest is of the padding only."""
    h = hashlib.sha256(f"{model.tokenizer.pad_token_id}:{model.tokenizer.model_max_length}".encode())
    folder = Path(model.folder) / "tokenizer"
    if Path(model.folder).is_dir() and folder.is_dir():
        for f in sorted(folder.iterdir()):
            if f.is_file():
                h.update(f"{f.name}:{f.stat().st_size}:".encode())
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


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
    temporary file and renamed, so an existing file is replaced whole or not at all. Returns the metadata.

    model: the StableDiffusion that inverted (loaded from a folder or single file); params: the DiffEditParams
    `method.invert` ran with. The file records params' step count, encoding ratio, sampler, inversion guidance,
    LoRA scale and corrections as what the inversion used: the Inversion itself does not know them. What its
    tensors show is checked (its levels must be the ones params' num_inference_steps, inpaint_strength and sampler
    give on this model, its latent channels the model's); the inversion guidance, LoRA scale and corrections
    cannot be seen in the latents, so params must be the very ones the inversion ran with. image_size: the input
    picture's (width, height), ints >= 1, which the model works on at the latents' size; prompt: None or the text
    it was inverted with; seed: None or an int in [0, 2**63); picture (optional): the PIL image inverted, recorded
    as its digest (`check_picture` compares it).
    Every argument and the path (a file in an existing, writable folder, not inside the model's folder nor its
    file: `InversionPathError`) is checked before anything is written: a wrong type is a TypeError, a wrong value
    a ValueError, each naming the argument."""
    path = check_save_arguments(path, inversion, model, params, image_size, prompt, seed, picture)
    image_size = (int(image_size[0]), int(image_size[1]))
    seed = None if seed is None else int(seed)
    meta = inversion_metadata(inversion, model=model, params=params, image_size=image_size, prompt=prompt,
                              seed=seed, picture=picture)
    commit([Planned(path, "latents file", inversion_writer(inversion, meta))])
    return meta


def check_model_argument(model, what: str, optional: bool = False) -> None:
    """`model` is a loaded StableDiffusion (or None when `optional`): else a TypeError saying how to get one."""
    from .stable_diffusion import StableDiffusion

    if (model is None and optional) or isinstance(model, StableDiffusion):
        return
    raise TypeError(f"model: expected {'None or ' if optional else ''}the loaded StableDiffusion {what} (load a "
                    f"folder with StableDiffusion.from_pretrained or a file with from_single_file), got "
                    f"{type(model).__name__}")


def check_save_arguments(path, inversion, model, params, image_size, prompt, seed, picture) -> Path:
    """What `save_inversion` checks before it writes anything (its docstring says what each must be); the path
    as a Path."""
    import torch

    from .method import Inversion
    from .params import DiffEditParams

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a file path (str or os.PathLike), got {type(path).__name__}")
    check_model_argument(model, "that inverted")
    if model.folder is None:
        raise ValueError("model: an inversion is saved with the model folder or file it came from; load the model "
                         "with StableDiffusion.from_pretrained or from_single_file")
    if not isinstance(inversion, Inversion):
        raise TypeError(f"inversion: expected method.invert's result (a method.Inversion), got "
                        f"{type(inversion).__name__}")
    if not isinstance(params, DiffEditParams):
        raise TypeError(f"params: expected the DiffEditParams the inversion ran with, got {type(params).__name__}")
    if (isinstance(image_size, (str, bytes)) or not hasattr(image_size, "__len__") or len(image_size) != 2
            or not all(is_integral(v) and v >= 1 for v in image_size)):
        raise ValueError(f"image_size: expected the picture's (width, height), two ints >= 1, got {image_size!r}")
    if prompt is not None and not isinstance(prompt, str):
        raise TypeError(f"prompt: expected None or the text the picture was inverted with, got "
                        f"{type(prompt).__name__}")
    if seed is not None and not (is_integral(seed) and 0 <= seed < 2**63):
        raise ValueError(f"seed: expected None or an int in [0, 2**63), got {seed!r}")
    if picture is not None:
        import PIL.Image

        if not isinstance(picture, PIL.Image.Image):
            raise TypeError(f"picture: expected None or the PIL image that was inverted, got "
                            f"{type(picture).__name__}")
    latents, timesteps, clean = inversion.latents, inversion.timesteps, inversion.clean
    if latents.ndim != 5:
        raise ValueError(f"inversion: expected latents of shape (1, T, C, h, w), got {tuple(latents.shape)}")
    if latents.shape[0] != 1:
        raise ValueError(f"inversion: a file holds one image's inversion, got a batch of {latents.shape[0]}")
    if tuple(clean.shape) != (1, *latents.shape[2:]) or tuple(timesteps.shape) != (latents.shape[1],):
        raise ValueError(f"inversion: its tensors disagree (latents {tuple(latents.shape)}, timesteps "
                         f"{tuple(timesteps.shape)}, clean {tuple(clean.shape)})")
    if latents.shape[2] != model.vae.config.latent_channels:
        raise ValueError(f"inversion: {latents.shape[2]} latent channels, but the model's VAE has "
                         f"{model.vae.config.latent_channels}: it was made with another model")
    mismatch = _size_mismatch(model, tuple(int(v) for v in image_size), latents)
    if mismatch:
        raise ValueError(f"image_size: {mismatch}: pass the size of the picture that was inverted")
    if not all(bool(torch.isfinite(t).all()) for t in (latents, clean)):
        raise ValueError("inversion: holds NaN or infinite values; a file of it could never be used (invert again)")
    expected = inversion_levels(model, params)
    if not torch.equal(timesteps.detach().cpu().long(), expected):
        raise ValueError(f"params: num_inference_steps={params.num_inference_steps}, inpaint_strength="
                         f"{params.inpaint_strength:g} and sampler {params.sampler} give the levels "
                         f"{expected.tolist()} on this model, but the inversion holds {timesteps.tolist()}: pass the "
                         "params it was inverted with")
    try:
        check_outputs([Planned(Path(path), "latents file")], {}, protected=[("model", model.folder)])
    except OutputPathError as e:
        raise InversionPathError(str(e)) from None
    return Path(path)


def _size_mismatch(model, image_size: tuple[int, int], latents) -> str:
    """Why latents (..., h, w) cannot be the inversion of a picture of `image_size` (width, height) on `model`: the
    model works on it at another size (`image_tensors.working_size`); "" when they fit."""
    from .image_tensors import working_size

    f, (h, w) = model.vae_scale_factor, latents.shape[-2:]
    working = working_size(image_size, f)
    if working == (w * f, h * f):
        return ""
    return (f"a {image_size[0]}x{image_size[1]} picture is worked on at {working[0]}x{working[1]} pixels, but the "
            f"latents are {w}x{h} ({w * f}x{h * f} pixels)")


def inversion_levels(model, params):
    """The levels (timesteps, noisiest first) `method.invert` leaves latents at for `params` on `model`: DDIM's
    inverse schedule, or DPM-Solver++'s decoding levels. A step count or ratio that runs no step is a ValueError
    naming `params`."""
    from . import method

    try:
        return method.inversion_timesteps(model, params).cpu().long()
    except ValueError as e:
        raise ValueError(f"params: {one_line(e)}") from None


def _recorded_levels(model, meta: dict, path: Path):
    """The levels an inversion with a file's recorded steps, strength and sampler holds on `model`."""
    from .params import DiffEditParams

    steps, schedule = meta["steps"], model.scheduler.config.num_train_timesteps
    if steps > schedule:
        raise InversionFileError(f"latents file {path} was inverted with {steps} steps, more than the model's "
                                 f"schedule of {schedule}: it is damaged or from another model; invert again")
    params = DiffEditParams(num_inference_steps=steps, inpaint_strength=meta["strength"],
                            sampler=meta.get("sampler", "ddim"))
    try:
        return inversion_levels(model, params)
    except ValueError as e:
        raise InversionFileError(f"latents file {path} has damaged metadata ({one_line(e)}): invert again") from None


def load_inversion(path: Path, model=None):
    """A saved inversion -> (method.Inversion with a batch of one, metadata). With a model (a StableDiffusion
    loaded from a folder) the file must come from that model (same fingerprint) and the tensors go to its device
    and dtype; without one (None) they stay float32 on the CPU. A model of another type (a folder's name) is a
    TypeError."""
    import torch
    from safetensors.torch import load_file

    from .method import Inversion

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a file path (str or os.PathLike), got {type(path).__name__}")
    check_model_argument(model, "to check the file against and load it onto", optional=True)
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
        recorded = meta.get("tokenizer")
        if recorded is not None and recorded != tokenizer_record(model):  # absent: older files
            raise InversionFileError(f"{path} was inverted with another tokenizer than {model.source}'s (its "
                                     "vocabulary, merges or padding differ, so do the prompt's text states): load "
                                     "the model it was inverted with or invert again")
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
        expected = _recorded_levels(model, meta, path)
        if not torch.equal(timesteps.long(), expected) or bool((timesteps != timesteps.long()).any()):
            raise InversionFileError(f"latents file {path} holds the levels {timesteps.tolist()}, but steps "
                                     f"{meta['steps']}, strength {meta['strength']:g} and sampler "
                                     f"{meta.get('sampler', 'ddim')} give {expected.tolist()} on this model: it is "
                                     "damaged or from another model; invert again")
        mismatch = _size_mismatch(model, (meta["width"], meta["height"]), latents)
        if mismatch:
            raise InversionFileError(f"latents file {path} does not fit its own metadata ({mismatch}): it is "
                                     "damaged; invert again")
    device, dtype = (model.device, model.dtype) if model is not None else (torch.device("cpu"), torch.float32)
    inversion = Inversion(latents[None].to(device, dtype), timesteps.long(), clean[None].to(device, dtype))
    return inversion, meta
