"""`POST /v1/images/edits` (OpenAI `images.edit`): image-to-image and inpainting for the families
that make edits (SD3, FLUX and their tiny variants; `FamilyStages.edit_pipelines`).

The body is multipart/form-data, as the official client sends it: the file `image` (also
`image[]`, one file), optionally the file `mask`, and the fields of `POST /v1/images/generations`
(`prompt`, `model`, `n`, `size`, `response_format`, `stream`, `partial_images`, `steps`, `seed`,
`guidance_scale`, `negative_prompt`, `slo_ms`, ...) plus `strength` (0 < s <= 1, default 0.6 as
diffusers': the share of the schedule run from the noised image; `steps` counts the whole
schedule, so 28 steps at 0.6 run 17). `size` defaults to the image's own, rounded down to the
model's size multiple; the pipeline resizes the image (and mask) to it.

Mask: OpenAI's convention is kept at the door: the areas where the mask PNG is fully transparent
(alpha = 0) are the ones to edit. It becomes diffusers' convention (white = repaint) here: alpha 0
-> 255, any other alpha -> 0. The mask must have an alpha channel and the image's size.

Everything is checked here, before admission: a bad upload or field is a 4xx naming it, and no
generation starts. The image (uint8 (1, H, W, 3)) and mask (uint8 (1, H, W)) go to the encode
stage as tensors of the request's payload (`trident_rs.models.image_edit`); the rest of the way
is the generations endpoint's (`Ingress._images`, `Ingress._image_stream`).
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from pydantic import ValidationError

from trident_rs.errors import InvalidRequestError
from trident_rs.models.families import get_family
from trident_rs.models.spec import get_spec
from trident_rs.request import GenerationParams
from trident_rs.serve.openai_bodies import ImagesRequest, parse_size

MAX_INPUT_PIXELS = 4096 * 4096  # larger uploads are refused before they are decoded
FILE_FIELDS = ("image", "image[]", "mask")
INT_FIELDS = ("n", "steps", "seed", "partial_images")
FLOAT_FIELDS = ("guidance_scale", "slo_ms", "strength")
IGNORED_FIELDS = ("input_fidelity", "output_compression")  # OpenAI's, with no meaning here


@dataclass(frozen=True)
class EditRequest:
    """A checked edit: the generations body it shares the path with, the resolved params of its
    first image, the encode stage's input tensors, and a digest of it all (idempotency)."""

    body: ImagesRequest
    params: GenerationParams
    inputs: dict[str, np.ndarray]
    digest: str


async def read_form(request) -> tuple[dict[str, str], dict[str, bytes]]:
    """(text fields, file fields) of a multipart or urlencoded body; 4xx on anything else."""
    ctype = request.headers.get("content-type", "").lower()
    if not ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise InvalidRequestError("body", "must be multipart/form-data with an 'image' file")
    try:
        form = await request.form()
    except Exception as e:  # noqa: BLE001 - any parser error is the client's
        raise InvalidRequestError("body", f"malformed form data ({type(e).__name__}: {str(e)[:120]})") from None
    fields: dict[str, str] = {}
    files: dict[str, bytes] = {}
    for key, value in form.multi_items():
        if key in fields or key in files:
            raise InvalidRequestError(key, "given more than once (one image per edit)")
        if isinstance(value, str):
            if key in FILE_FIELDS:
                raise InvalidRequestError(key, "must be a file upload")
            fields[key] = value
        elif key not in FILE_FIELDS:
            raise InvalidRequestError(key, f"file uploads are taken for {FILE_FIELDS} only")
        else:
            files[key] = await value.read()
    return fields, files


def parse_edit(fields: dict[str, str], files: dict[str, bytes],
               resolve: Callable[..., GenerationParams]) -> EditRequest:
    """The form -> an `EditRequest`; `InvalidRequestError` naming the first bad field. From the
    ingress: `resolve(**fields)`, its check of generation params (served model, limits)."""
    if "image" in files and "image[]" in files:
        raise InvalidRequestError("image", "give one image")
    data = files.get("image", files.get("image[]"))
    if data is None:
        raise InvalidRequestError("image", "missing: upload the image to edit as the 'image' file")
    values = _typed(fields)
    strength = values.pop("strength", None)
    for name in IGNORED_FIELDS:
        values.pop(name, None)
    try:
        body = ImagesRequest.model_validate(values)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(x) for x in first.get("loc", ())) or "body"
        raise InvalidRequestError(field, first.get("msg", "invalid")) from None
    spec = get_spec(body.model)  # unknown everywhere -> 404 naming the known ones
    if not get_family(spec.family).stages.edit_pipelines:
        raise InvalidRequestError("model", f"{body.model} makes no image edits; edits: the sd3 and flux families")
    image = _open(data, "image")
    height, width = _size(body.size, image.size, spec.size_multiple)
    inputs = {"image": np.asarray(image.convert("RGB"))[None].copy()}
    if "mask" in files:
        inputs["mask"] = _repaint_mask(_open(files["mask"], "mask"), image.size)
    params = resolve(model=body.model, prompt=body.prompt, negative_prompt=body.negative_prompt, height=height,
                     width=width, steps=body.steps, guidance_scale=body.guidance_scale, seed=body.seed,
                     slo_ms=body.slo_ms, edit="inpaint" if "mask" in inputs else "img2img", strength=strength)
    digest = hashlib.sha256(b"".join(a.tobytes() for a in inputs.values())).hexdigest()
    return EditRequest(body, params, inputs, digest)


def _typed(fields: dict[str, str]) -> dict[str, Any]:
    """Form strings -> the JSON types the generations body takes (4xx naming a field that is not)."""
    out: dict[str, Any] = dict(fields)
    for name, kind in [(n, int) for n in INT_FIELDS] + [(n, float) for n in FLOAT_FIELDS]:
        if name in out:
            try:
                out[name] = kind(out[name])
            except ValueError:
                raise InvalidRequestError(name, f"{out[name][:40]!r} is not a{'n integer' if kind is int else ' number'}") from None
            if kind is float and not np.isfinite(out[name]):
                raise InvalidRequestError(name, "must be finite")
    if "stream" in out:
        flag = out["stream"].strip().lower()
        if flag not in ("true", "false", "1", "0"):
            raise InvalidRequestError("stream", f"{out['stream'][:40]!r} is not true or false")
        out["stream"] = flag in ("true", "1")
    return out


def _open(data: bytes, field: str):
    """The upload as a decoded PIL image; 4xx naming `field` if it is not one PIL reads."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > MAX_INPUT_PIXELS:
            raise InvalidRequestError(field, f"{image.width}x{image.height} is over {MAX_INPUT_PIXELS} pixels")
        image.load()
    except InvalidRequestError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a bad file
        raise InvalidRequestError(field, f"not an image (PNG, JPEG, WebP, ...): {type(e).__name__}") from None
    if image.width < 1 or image.height < 1:
        raise InvalidRequestError(field, "is empty")
    return image


def _size(size: str | None, image_size: tuple[int, int], multiple: int) -> tuple[int | None, int | None]:
    """(height, width): `size` 'WxH', or (None or 'auto') the image's own rounded down to `multiple`."""
    if size is not None and size.strip().lower() != "auto":
        return parse_size(size)
    w, h = image_size
    return max(multiple, h // multiple * multiple), max(multiple, w // multiple * multiple)


def _repaint_mask(mask, image_size: tuple[int, int]) -> np.ndarray:
    """OpenAI's mask (alpha 0 = edit) -> diffusers' (255 = repaint), uint8 (1, H, W)."""
    if mask.size != image_size:
        raise InvalidRequestError("mask", f"is {mask.width}x{mask.height}; the image is "
                                          f"{image_size[0]}x{image_size[1]}: they must match")
    if "A" not in mask.getbands() and "transparency" not in mask.info:
        raise InvalidRequestError("mask", "needs an alpha channel: its fully transparent areas are edited")
    alpha = np.asarray(mask.convert("RGBA"))[..., 3]
    return np.where(alpha == 0, 255, 0).astype(np.uint8)[None]
