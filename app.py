"""Edit a face in the browser: counterfactuals toward or away from the attribute the guide steers, and new samples.

    pip install -r requirements-app.txt
    python app.py --run_dir runs/toyfaces                                  # then open http://127.0.0.1:7860
    python app.py --diffusion_model d.pth --classifier_model c.pth --oracle_model o.pth --device cpu --port 8080
"""
import os
import time
from functools import partial

import torch
from PIL import Image

from common import ArgumentParser, UserError, amp_dtype, autocast, check_scales, resolve_device, run_main, to_uint8
from dataset import load_image_file, preprocess_pil, to_float
from generate import (EDIT_DEFAULTS, RUN_FILES, SAMPLE_DEFAULTS, difference_map, generate_images, guide_probabilities,
                      hit_rate, load_models, make_counterfactuals, oracle_probabilities, run_split)

MAX_PIXELS, WORD, YES = 25_000_000, ("absent", "present"), ("no", "yes")   # larger uploads are refused unread
CSS = ".image-container img { width: 100%; height: 100%; object-fit: contain } img { image-rendering: pixelated }"
EDIT_SCALES, SAMPLE_SCALES = (" ".join(f"{s:g}" for s in d["guidance_scale"]) for d in (EDIT_DEFAULTS, SAMPLE_DEFAULTS))


def load_face(image, size: int) -> torch.Tensor:
    """A file path, a PIL image or gradio's upload dict -> (1,3,S,S) in [-1, 1], prepared like the training data."""
    image = image.get("path") if isinstance(image, dict) else image
    if image is None:
        raise UserError("no face given; upload an image or click one of the test faces")
    if isinstance(image, Image.Image):
        return to_float(torch.from_numpy(preprocess_pil(image, size)).permute(2, 0, 1)[None])
    try:
        with Image.open(image) as img:                                        # reads only the header
            pixels = img.width * img.height
    except Image.DecompressionBombError:                                      # PIL's own limit, far above ours
        raise UserError(f"the image is over {MAX_PIXELS / 1e6:g} MP; upload a smaller one") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f"the upload is not a readable image ({type(e).__name__}); upload a PNG or JPEG face") from None
    if pixels > MAX_PIXELS:
        raise UserError(f"image {img.width}x{img.height} is over {MAX_PIXELS / 1e6:g} MP; upload a smaller one")
    try:
        return to_float(load_image_file(image, size)[None])                   # (1,3,S,S)
    except UserError as e:
        raise UserError(f"the upload is not a readable image ({e}); upload a PNG or JPEG face") from None


def parse_scales(text) -> list:
    """'30 60 120' -> [30.0, 60.0, 120.0]: one guidance scale, or a ladder (tried from the smallest)."""
    try:
        scales = [float(s) for s in str(text).replace(",", " ").split()]
    except ValueError:
        scales = []
    if not scales:
        raise UserError(f"guidance scales '{text}': write one number >= 0, or a ladder such as {EDIT_SCALES}")
    check_scales("guidance scales", scales)                                   # finite, >= 0, each once
    return scales


def counterfactual(m, image, target: int, strength=EDIT_DEFAULTS["strength"], scales=EDIT_SCALES, seed=0) -> dict:
    """A counterfactual of ``image`` toward ``target`` (1: present, 0: absent). -> {"images": [original, counterfactual,
    difference], "table": the oracle's verdicts, "flipped_oracle", "flipped_guide", "scale", "seconds", "summary"}"""
    t_begin, scales, x_in = time.perf_counter(), parse_scales(scales), load_face(image, m.d_ckpt["image_size"])
    if not 0 <= strength <= 1:                       # the page sends it unchecked (its event skips preprocessing)
        raise UserError(f"the strength must be in [0, 1], got {strength}")
    x_cf, _, used = make_counterfactuals(m, x_in, int(target), scales, strength=strength, seed=seed,
                                         amp=autocast(m.device, amp_dtype(m.device)))
    (p0, p1), k = oracle_probabilities(m, torch.cat([x_in, x_cf])).tolist(), m.target_index   # (2,A): before, after
    flipped_guide = (guide_probabilities(m, x_cf)[0, m.guide.cfg.target_index].item() > 0.5) == bool(target)
    seconds, flipped, scale = time.perf_counter() - t_begin, (p1[k] > 0.5) == bool(target), used[0].item()
    table = [[name + (" (steered)" if i == k else ""), f"{b:.2f} {WORD[b > 0.5]}", f"{a:.2f} {WORD[a > 0.5]}"]
             for i, (name, b, a) in enumerate(zip(m.attr_names, p0, p1))]
    images = [Image.fromarray(a) for a in (*to_uint8(torch.cat([x_in, x_cf])), difference_map(x_in, x_cf)[0])]
    return {"images": images, "table": table, "flipped_oracle": flipped, "flipped_guide": flipped_guide, "scale": scale,
            "seconds": seconds, "summary": f"**flipped to {m.attribute} {WORD[int(target)]}?** oracle: **{YES[flipped]}"
                                           f"**, guide: {YES[flipped_guide]}; scale {scale:g}; {seconds:.1f} s"}


def sample(m, target: int, scales=SAMPLE_SCALES, n=8, seed=0) -> dict:
    """``n`` faces per scale toward ``target`` -> {"images": [(PIL, caption)], "rates": {scale: oracle's share with the
    target}, "seconds", "summary"}"""
    t_begin, scales, images, rates = time.perf_counter(), parse_scales(scales), [], {}
    if int(n) < 1:
        raise UserError(f"faces per scale must be 1 or more, got {n}")
    for s in scales:
        x = generate_images(m, int(target), s, n=int(n), sampler=SAMPLE_DEFAULTS["sampler"], seed=seed,
                            steps=SAMPLE_DEFAULTS["steps"], amp=autocast(m.device, amp_dtype(m.device)))
        p = oracle_probabilities(m, x)[:, m.target_index]                              # (N,) p(present)
        rates[s] = hit_rate(p, int(target))
        images += [(Image.fromarray(a), f"s={s:g} p={q:.2f}") for a, q in zip(to_uint8(x), p.tolist())]
    seconds, rated = time.perf_counter() - t_begin, ", ".join(f"{r:.0%} at scale {s:g}" for s, r in rates.items())
    return {"images": images, "rates": rates, "seconds": seconds,
            "summary": f"{m.attribute} {WORD[int(target)]} by the oracle: {rated}; {seconds:.1f} s"}


def build_app(m):
    """The page. The handlers take and return plain values (gradio is imported only here, to serve); a UserError they
    raise shows as a message on the page, whose outputs keep the previous result."""
    import gradio as gr

    def page(fn, outputs, progress=gr.Progress(track_tqdm=True), *args):    # progress: shows the samplers' tqdm bars
        try:
            return outputs(fn(m, *args))
        except UserError as e:
            raise gr.Error(str(e)) from None
    with gr.Blocks(title="GuidedEmotion", analytics_enabled=False) as app:
        gr.Markdown(f"### GuidedEmotion: the guide steers {m.attribute}; an independent oracle judges every attribute")
        target = gr.Radio([(f"{m.attribute} present", 1), (f"{m.attribute} absent", 0)], value=1, label="target")
        with gr.Tab("Counterfactual"), gr.Row():
            with gr.Column(scale=2):
                face = gr.Image(label="face (upload one, or click a test face)", type="filepath", height=200)
                try:             # a few test-split faces of the run's dataset (never trained on), where the data is
                    faces = run_split(m, "test").images[:8]
                    gr.Examples([[Image.fromarray(f.permute(1, 2, 0).numpy())] for f in faces], face, "test faces")
                except UserError as e:
                    print(f"warning: no test faces to offer ({e})")
                edit = [face, target, gr.Slider(0, 1, EDIT_DEFAULTS["strength"], step=0.05, label="strength (t0 / T)"),
                        gr.Textbox(EDIT_SCALES, label="guidance scales (a ladder: the first the guide calls flipped)")]
                go_edit = gr.Button("Make counterfactual", variant="primary", elem_id="edit")
            with gr.Column(scale=3):
                with gr.Row():
                    edited = [gr.Image(label=name, elem_id=name, height=220, format="png")
                              for name in ("original", "counterfactual", "difference")]
                edited += [gr.Dataframe(headers=["attribute", "before", "after"], label="oracle"), gr.Markdown()]
        with gr.Tab("Sample"):
            new = [target, gr.Textbox(SAMPLE_SCALES, label="guidance scales (a row of faces per scale)"),
                   gr.Slider(1, 16, 8, step=1, label="faces per scale")]
            go_new = gr.Button("Sample", variant="primary")
            made = [gr.Gallery(label="s: guidance scale, p: the oracle's p(present)", columns=8), gr.Markdown()]
        kw = dict(concurrency_id="models", show_progress="minimal")   # one job at a time; the last result stays in view
        go_edit.click(partial(page, counterfactual, lambda r: (*r["images"], r["table"], r["summary"])), edit, edited,
                      preprocess=False, **kw)                   # the upload's path reaches load_face, which checks it
        go_new.click(partial(page, sample, lambda r: (r["images"], r["summary"])), new, made, **kw)
    return app


def main() -> int:
    p = ArgumentParser(__doc__)
    p.add_argument("--run_dir", default=None, help="a train.py --output_dir holding " + ", ".join(RUN_FILES))
    for key, name in zip(("diffusion", "classifier", "oracle"), RUN_FILES):
        p.add_argument(f"--{key}_model", default=None, help=f"{key} checkpoint (default: <run_dir>/{name})")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface; no login)")
    p.add_argument("--port", type=int, default=7860, help="port to serve on")
    p.add_argument("--device", default="cuda", help="cuda, cpu, cuda:1, mps (falls back to cpu without CUDA)")
    args = p.parse_args()
    paths = [vars(args)[k + "_model"] or args.run_dir and os.path.join(args.run_dir, f)
             for k, f in zip(("diffusion", "classifier", "oracle"), RUN_FILES)]
    if None in paths:
        raise UserError("pass --run_dir, or all three of --diffusion_model, --classifier_model and --oracle_model")
    m = load_models(*paths, resolve_device(args.device, "editing"))
    try:
        build_app(m).launch(server_name=args.host, server_port=args.port, show_error=True, css=CSS)
    except ImportError as e:
        raise UserError(f"gradio cannot be imported ({e}); run pip install -r requirements-app.txt") from None
    except (OSError, OverflowError) as e:                                        # a port taken or out of range
        raise UserError(f"cannot serve on {args.host}:{args.port} ({e}); pick another --port or --host") from None
    return 0


if __name__ == "__main__":
    run_main(main)
