"""Figures that compare with papers: the FID of a run's samples, and DiME/ACE's counterfactual protocol.

    python evaluate.py fid --run_dir runs/toyfaces --num_samples 1000 [--target_label 1 --guidance_scale 30]
    python evaluate.py counterfactuals --run_dir runs/toyfaces --n 500 [--guidance_scale 60 --no_localize]

Writes <run_dir>/eval/<job>.json and .md (--out DIR to change) and prints the table. FID needs requirements-eval.txt
(--fid_weights PATH: local Inception-v3 weights); without it, Fréchet distances use the oracle's features, "FD (oracle
features)", never called FID. FID: Heusel et al. 2017, arXiv:1706.08500. DiME: arXiv:2203.15636. ACE: arXiv:2303.09962
and its code, github.com/guillaumejs2403/ACE. COUT: Khorram & Fuxin, CVPR 2022. FastDiME: arXiv:2312.14223.
"""
import os
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from common import (PRECISION_HELP, PRECISIONS, ArgumentParser, UserError, amp_dtype, atomic_save, autocast,
                    check_positive, check_scales, check_seed, ensure_writable_dir, refuse_folder, resolve_device,
                    run_main, to_json, to_uint8)
from dataset import to_float, toyface_counterfactuals
from diffusion_model import SAMPLERS
from generate import (SAMPLE_DEFAULTS, counterfactual_metrics, dataset_inputs, generate_images, guide_probabilities,
                      load_run, make_counterfactuals, oracle_probabilities, run_split)

FID_COLUMNS = {"n_samples": "samples", "n_test": "test images", "sampler": "sampler", "steps": "steps", "fd": "FD"}
CF_COLUMNS = {"n": "n", "flip_rate_oracle": "flip (oracle)", "flip_rate_guide": "flip (guide)", "fd": "FD",
              "sfd": "sFD", "mnac": "MNAC", "cd": "CD", "cout": "COUT", "l1_mean": "L1", "l1_to_exact": "L1 to exact",
              "unet_calls": "UNet calls / cf", "guide_grads": "guide grads / cf"}
NOTE = ("DiME/ACE judge the flip by the classifier explained (128 px CelebA), here an independent oracle (run's size)"
        ": 'flip (guide)' compares with theirs. Their code scores only the counterfactuals that classifier flipped, "
        "and its MNAC counts the target too (about ours + the flip rate); ours scores every counterfactual and counts "
        "the other attributes. FID/sFID pool both directions; without Inception: FD (oracle features)")
# Network calls per counterfactual at the papers' CelebA defaults. Their quality figures on CelebA Smile (128 px,
# judged by the explained classifier) are in DiME's and ACE's Table 1 (arXiv:2203.15636, arXiv:2303.09962).
PAPERS = {"DiME": {"calls": "≈ 1,830 UNet calls per guidance scale (60 + 60·59/2, its inner x̂0 chain)"},
          "ACE": {"calls": "≈ 250 UNet forward+backward"}, "FastDiME": {"calls": "≈ 60 UNet calls"}}


def get_parser() -> ArgumentParser:
    shared = ArgumentParser(add_help=False)
    shared.add_argument("--run_dir", required=True, help="training run folder (train.py --output_dir)")
    shared.add_argument("--out", default=None, help="folder for <job>.json and <job>.md (default <run_dir>/eval)")
    shared.add_argument("--fid_weights", default=None, help="torch-fidelity's Inception-v3 weights (default: download)")
    shared.add_argument("--sampler", default=None, choices=SAMPLERS, help="sampler (default: generate.py's)")
    shared.add_argument("--steps", type=int, help="network calls over the schedule (default: generate.py's)")
    shared.add_argument("--seed", type=int, default=0, help="seed of the sampling noise and of sFID's split")
    shared.add_argument("--batch_size", type=int, default=64, help="images per batch")
    shared.add_argument("--device", default="cuda", help="cuda, cpu, cuda:1, mps (falls back to cpu without CUDA)")
    shared.add_argument("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)
    p = ArgumentParser(__doc__)
    jobs = p.add_subparsers(dest="job", required=True)
    fid = jobs.add_parser("fid", parents=[shared], help="FID of samples from noise against the test split")
    fid.add_argument("--num_samples", type=int, default=1000, help="samples to draw")
    fid.add_argument("--target_label", type=int, choices=(0, 1), help="guide toward this label (default: unguided)")
    fid.add_argument("--guidance_scale", type=float, help="scale with --target_label (default: generate.py's)")
    cf = jobs.add_parser("counterfactuals", parents=[shared], help="DiME/ACE's metrics of test counterfactuals")
    cf.add_argument("--n", type=int, default=200, help="test images per direction (toward 1, toward 0)")
    cf.add_argument("--guidance_scale", type=float, nargs="+", help="ladder of scales (default: generate.py's)")
    cf.add_argument("--strength", type=float, help="start noise level (default: generate.py's)")
    cf.add_argument("--preserve", type=float, help="weight holding the other attributes (default: generate.py's)")
    cf.add_argument("--no_localize", action="store_true", help="let the whole image change (no ACE-style mask)")
    cf.add_argument("--mask_threshold", type=float, default=0.05, help="localisation threshold (as generate.py's)")
    return p


def feature_net(m, weights):
    """(fn, "FID"): Inception-v3 pool features (uint8, resized to 299 px); else (oracle's, "FD (oracle features)")."""
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                 feature_extractor_weights_path=weights).to(m.device)
    except (ImportError, OSError, RuntimeError) as e:           # not installed, or no download (offline)
        print(f"note: no Inception-v3 ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:100]}); "
              f"Fréchet distances use the oracle's features, labelled 'FD (oracle features)', not FID")
        return m.oracle.features, "FD (oracle features)"
    return (lambda x: net(torch.from_numpy(to_uint8(x)).permute(0, 3, 1, 2).to(m.device))), "FID"


@torch.no_grad()
def features(fn, x: torch.Tensor, device, batch_size: int = 64) -> np.ndarray:
    """fn over batches of images x (N,3,S,S), float in [-1, 1] or uint8. -> (N, D) float64"""
    return torch.cat([fn((to_float(b) if b.dtype == torch.uint8 else b).to(device)).double().cpu() for b in
                      tqdm(x.split(batch_size), desc="features", leave=False)]).numpy()


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """Heusel et al. 2017: ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) of features (N, D), in float64.
    S1 S2 is similar to the PSD S1^(1/2) S2 S1^(1/2), so tr (S1 S2)^(1/2) = sum of sqrt of its eigenvalues."""
    s1, s2 = (np.atleast_2d(np.cov(f, rowvar=False)) for f in (f1, f2))          # (D, D), unbiased
    eig = np.linalg.eigvals(s1 @ s2).real.clip(min=0)
    fd = ((f1.mean(0) - f2.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(eig).sum()
    return max(0.0, float(fd))                                   # >= 0: rounding makes FD(x, x) about -1e-5


def split_fd(f_x: np.ndarray, f_cf: np.ndarray, seed: int = 0) -> float:
    """ACE's sFID: shuffle the pairs, split them into halves A and B, and average FD(originals of A, counterfactuals
    of B) and FD(originals of B, counterfactuals of A), so that no image meets its own counterfactual."""
    perm = np.random.default_rng(seed).permutation(len(f_x))
    a, b = perm[:len(perm) // 2], perm[len(perm) // 2:]
    return (frechet_distance(f_x[a], f_cf[b]) + frechet_distance(f_x[b], f_cf[a])) / 2


def correlation_difference(labels: torch.Tensor, before: torch.Tensor, after: torch.Tensor, k: int) -> float:
    """CD, from DiME: sum_i |c_data[i] - c_cf[i]|; c_data[i] = Pearson correlation of attributes k and i over the
    training labels (M, A), c_cf[i] = that of the changes (after - before) of the oracle's decisions (N, A) on k and i
    over the counterfactuals; NaN (a constant column) counts as 0."""
    def corr_with_k(v):                                                  # (M, A) -> (A,)
        v = v.double() - v.double().mean(0)
        return torch.nan_to_num((v * v[:, k:k + 1]).sum(0) / (v.norm(dim=0) * v[:, k].norm()), nan=0.0)
    return (corr_with_k(labels) - corr_with_k(after.double() - before.double())).abs().sum().item()


@torch.no_grad()
def cout(prob, x: torch.Tensor, x_cf: torch.Tensor, steps: int = 50) -> float:
    """COUT (Khorram & Fuxin 2022, binary case): insert x_cf's pixels into x, most changed (|x_cf - x| over channels)
    first, max(1, H*W // steps) at a time; p_c = the classifier's ``prob`` (B,3,H,W) -> (B,) of x's predicted label;
    COUT = AUC(1 - p_c) - AUC(p_c) over the fraction inserted (trapezoid rule), in [-1, 1], averaged over the pairs."""
    n, _, h, w = x.shape
    order = (x_cf - x).abs().sum(1).flatten(1).argsort(dim=1, descending=True, stable=True)         # (N, H*W)
    counts = list(range(0, h * w, max(1, h * w // steps))) + [h * w]
    label, p_c = prob(x) > 0.5, []
    for c in tqdm(counts, desc="COUT", leave=False):
        p = prob(x + torch.zeros(n, h * w).scatter_(1, order[:, :c], 1.0).view(n, 1, h, w) * (x_cf - x))
        p_c.append(torch.where(label, p, 1 - p))
    auc_c = torch.trapezoid(torch.stack(p_c, 1), torch.tensor(counts) / (h * w), dim=1)      # (N, K) -> (N,)
    return (1 - 2 * auc_c).mean().item()                              # AUC(1 - p_c) = 1 - AUC(p_c) on [0, 1]


def run_fid(args, m, fn, amp) -> dict:
    scale = SAMPLE_DEFAULTS["guidance_scale"][0] if args.guidance_scale is None else args.guidance_scale
    scale = 0.0 if args.target_label is None else scale
    kw = dict(sampler=args.sampler or SAMPLE_DEFAULTS["sampler"], steps=args.steps or SAMPLE_DEFAULTS["steps"])
    name = "unguided" if scale == 0 else f"{m.attribute}={args.target_label}, scale {scale:g}"
    print(f"fid: {args.num_samples} samples ({name}, {kw['sampler']}-{kw['steps']}) against the test split")
    x = generate_images(m, args.target_label or 0, scale, n=args.num_samples, seed=args.seed,
                        batch_size=args.batch_size, amp=amp, **kw)
    test = run_split(m, "test").images                                   # uint8 (M,3,S,S)
    fd = frechet_distance(*(features(fn, v, m.device, args.batch_size) for v in (x, test)))
    return {name: {"n_samples": len(x), "n_test": len(test), **kw, "fd": fd}}


def run_counterfactuals(args, m, fn, amp) -> dict:
    """Per direction and pooled (n-weighted means; CD and Fréchet distances of the pooled pairs, as the papers: within
    one direction the steered attribute changes on the flipped faces alone, so CD there would measure flipped against
    not, and nothing once every face flips)."""
    recipe = {k: getattr(args, k) for k in ("strength", "preserve", "sampler", "steps") if getattr(args, k) is not None}
    labels, test = run_split(m, "train").attrs, run_split(m, "test")        # attributes in the models' order
    rows, pool, k = {}, [], m.target_index
    for target in (1, 0):
        x, names = dataset_inputs(m, args.n, target, test)
        print(f"toward {target}: counterfactuals of {len(x)} test faces with {m.attribute} = {1 - target}")
        m.unet_calls["images"] = m.guide_grads["images"] = 0
        x_cf = make_counterfactuals(m, x, target, args.guidance_scale, localize=not args.no_localize, seed=args.seed,
                                    mask_threshold=args.mask_threshold, batch_size=args.batch_size, amp=amp,
                                    **recipe)[0]
        before, after = oracle_probabilities(m, x), oracle_probabilities(m, x_cf)                # (N, A)
        s = counterfactual_metrics(m, x, x_cf, target, before, after)
        r = rows[f"toward {target}"] = {q: s[q] for q in CF_COLUMNS if q in s}      # n, flip rates, MNAC, L1
        r.update(unet_calls=m.unet_calls["images"] / len(x), guide_grads=m.guide_grads["images"] / len(x),
                 cout=cout(lambda b: guide_probabilities(m, b)[:, m.guide.cfg.target_index], x, x_cf))
        if m.d_ckpt["dataset"] == "toyfaces":           # L1 to the same faces redrawn with only the attribute changed
            r["l1_to_exact"] = ((x_cf - to_float(torch.from_numpy(toyface_counterfactuals(names, "test", m.d_ckpt[
                "image_size"], m.d_ckpt["args"].get("seed", 0), m.attribute, target)))).abs() / 2).mean().item()
        pool.append((x, x_cf, before > 0.5, after > 0.5))
    x, x_cf, before, after = (torch.cat(v) for v in zip(*pool))
    f_x, f_cf = features(fn, x, m.device, args.batch_size), features(fn, x_cf, m.device, args.batch_size)
    rows["pooled"] = {**{key: sum(r[key] * r["n"] for r in rows.values()) / len(x) for key in r}, "n": len(x),
                      "cd": correlation_difference(labels, before, after, k), "fd": frechet_distance(f_x, f_cf),
                      "sfd": split_fd(f_x, f_cf, args.seed)}
    return rows


def markdown_table(rows: dict, columns: dict) -> str:
    """{row: {key: value}} -> a Markdown table of ``columns`` {key: header}; a missing value shows as '–'."""
    cell = lambda v: "–" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
    return "\n".join([f"| | {' | '.join(columns.values())} |", "|---" * (len(columns) + 1) + "|"]
                     + [f"| {name} | {' | '.join(cell(r.get(k)) for k in columns)} |" for name, r in rows.items()])


def main() -> int:
    args = get_parser().parse_args()                           # every flag and path checked before any loading
    if not os.path.isfile(os.path.join(args.run_dir, "diffusion_final.pth")):
        raise UserError(f"--run_dir '{args.run_dir}' holds no diffusion_final.pth; pass a finished train.py run")
    for name in ("steps", "batch_size", "num_samples", "n", "preserve", "strength"):
        check_positive("--" + name, getattr(args, name, None), allow_zero=name in ("preserve", "strength"))
    check_scales("--guidance_scale", args.guidance_scale)
    if min(getattr(args, "num_samples", 2), getattr(args, "n", 2)) < 2:
        raise UserError("a Fréchet distance needs at least 2 images; pass --num_samples/--n >= 2")
    if (getattr(args, "strength", 0) or 0) > 1:
        raise UserError(f"--strength must be in [0, 1], got {args.strength}")
    if not 0 <= getattr(args, "mask_threshold", 0) < 1:
        raise UserError(f"--mask_threshold must be in [0, 1), got {args.mask_threshold}")
    if args.job == "fid" and args.guidance_scale is not None and args.target_label is None:
        raise UserError("--guidance_scale needs --target_label (without one the samples are unguided)")
    check_seed(args.seed)
    try:          # weights_only refuses a file that would run code on load; torch-fidelity loads it unchecked
        assert args.fid_weights is None or isinstance(torch.load(args.fid_weights, "cpu", weights_only=True), dict)
    except Exception:
        raise UserError(f"--fid_weights '{args.fid_weights}' is missing or no weights file; pass torch-fidelity's "
                        "weights-inception-2015-12-05-6726825d.pth or drop the flag") from None
    m = load_run(args.run_dir, device := resolve_device(args.device, "evaluating"))
    if (args.steps or 0) > m.diffusion.num_timesteps:
        raise UserError(f"--steps {args.steps} is more than the model's {m.diffusion.num_timesteps} timesteps")
    path = os.path.join(ensure_writable_dir(args.out or os.path.join(args.run_dir, "eval"), "--out folder"), args.job)
    for ext in (".json", ".md"):                                   # written at the end: refused before the work
        refuse_folder(path + ext, "--out's " + ext)
    fn, label = feature_net(m, args.fid_weights)
    t0, fid = time.time(), args.job == "fid"
    rows = (run_fid if fid else run_counterfactuals)(args, m, fn, autocast(device, amp_dtype(device, args.precision)))
    cols = {k: {"fd": label, "sfd": "s" + label}.get(k, v) for k, v in (FID_COLUMNS if fid else CF_COLUMNS).items()}
    md = "\n\n".join([f"# {args.job}: {m.attribute}, {args.run_dir}", markdown_table(rows, cols)] + ([] if fid else [
        NOTE, "Cost per counterfactual at the papers' CelebA defaults (their quality figures: DiME's and ACE's "
        "Table 1, CelebA Smile at 128 px):", markdown_table(PAPERS, {"calls": "network calls / cf"})]))
    atomic_save(to_json({"job": args.job, "args": vars(args), "attribute": m.attribute, "features": label,
                         "seconds": round(time.time() - t0, 1), "rows": rows, "papers": None if fid else PAPERS}),
                path + ".json")
    atomic_save(md + "\n", path + ".md")
    print(md + f"\nwrote {path}.json and {path}.md ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    run_main(main)
