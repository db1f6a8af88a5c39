"""evaluate.py: the Fréchet distance against closed forms, sFID's split, CD and COUT on built cases, the call
counter, both jobs end to end on a tiny run (with the oracle-feature fallback) and bad input."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dataset import to_float
from evaluate import correlation_difference, cout, features, frechet_distance, split_fd
from fakes import assert_ok, assert_user_error, run, run_here


def with_moments(mu, cov, n=40, seed=0):
    """n feature vectors whose sample mean is mu and whose sample covariance (unbiased) is cov, exactly."""
    z = np.random.default_rng(seed).standard_normal((n, len(mu)))
    q, _ = np.linalg.qr(z - z.mean(0))               # orthonormal columns, each orthogonal to the ones vector
    return np.asarray(mu) + q * np.sqrt(n - 1) @ np.linalg.cholesky(np.asarray(cov)).T


def test_frechet_distance_closed_forms():
    # diagonal covariances: FD = |mu_a - mu_b|^2 + sum_i (s_a,i - s_b,i)^2 with s the standard deviations
    sa, sb, mu_a, mu_b = np.array([1.0, 2.0, 0.5]), np.array([3.0, 1.0, 0.5]), [0.0, 1.0, 2.0], [1.0, -1.0, 2.0]
    a, b = with_moments(mu_a, np.diag(sa ** 2)), with_moments(mu_b, np.diag(sb ** 2), seed=1)
    assert frechet_distance(a, b) == pytest.approx(1 + 4 + ((sa - sb) ** 2).sum(), rel=1e-9)
    assert abs(frechet_distance(a, a)) < 1e-9
    few = np.random.default_rng(0).standard_normal((3, 64))      # fewer images than features: S1 S2 is singular and
    assert 0 <= frechet_distance(few, few) < 1e-9                # the raw sum rounds to about -1e-5
    # 2x2 covariances that do not commute: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for M = S1 S2 (eigenvalues >= 0)
    s1, s2 = np.array([[2.0, 0.8], [0.8, 1.0]]), np.array([[1.0, -0.3], [-0.3, 3.0]])
    assert not np.allclose(s1 @ s2, s2 @ s1)
    m = s1 @ s2
    expected = 0.5 ** 2 + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
    got = frechet_distance(with_moments([0.5, 0.0], s1), with_moments([0.0, 0.0], s2, seed=2))
    assert got == pytest.approx(expected, rel=1e-9)


def stand_in_network():
    """A fixed random conv + pooling module, where Inception-v3 would go: (B,3,S,S) -> (B,4)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten()).eval()


def test_image_sets_to_features_to_fd():
    net, g = stand_in_network(), torch.Generator().manual_seed(0)
    u1 = torch.randint(0, 256, (30, 3, 16, 16), generator=g, dtype=torch.uint8)
    x2 = torch.rand(25, 3, 16, 16, generator=g) - 0.3
    f1, f2 = features(net, u1, "cpu", batch_size=7), features(net, x2, "cpu", batch_size=7)   # uint8 and float inputs
    with torch.no_grad():
        h1, h2 = (net(x).double().numpy() for x in (to_float(u1), x2))
    assert f1.dtype == np.float64 and np.allclose(f1, h1, atol=1e-6) and np.allclose(f2, h2, atol=1e-6)
    mu1, mu2 = h1.mean(0), h2.mean(0)                 # the closed form by another route: symmetric square roots
    s1, s2 = ((h - mu).T @ (h - mu) / (len(h) - 1) for h, mu in ((h1, mu1), (h2, mu2)))
    w, v = np.linalg.eigh(s1)
    r1 = v @ np.diag(np.sqrt(w.clip(min=0))) @ v.T                        # S1^(1/2)
    tr_sqrt = np.sqrt(np.linalg.eigvalsh(r1 @ s2 @ r1).clip(min=0)).sum()
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert expected > 0.01 and frechet_distance(f1, f2) == pytest.approx(expected, rel=1e-6)


def test_fd_matches_torchmetrics():
    fid = pytest.importorskip("torchmetrics.image.fid", reason="torchmetrics (requirements-eval.txt) is not installed")
    net, g = stand_in_network(), torch.Generator().manual_seed(1)
    u1, u2 = (torch.randint(lo, 256, (24, 3, 16, 16), generator=g, dtype=torch.uint8) for lo in (0, 60))

    class OnUint8(torch.nn.Module):                   # torchmetrics feeds the feature module uint8 images
        def forward(self, u):
            return net(to_float(u))
    metric = fid.FrechetInceptionDistance(feature=OnUint8())
    metric.update(u1, real=True)
    metric.update(u2, real=False)
    assert frechet_distance(features(net, u1, "cpu"), features(net, u2, "cpu")) == \
        pytest.approx(metric.compute().item(), rel=1e-5)


def test_split_fd_meets_no_image_with_its_own_counterfactual(monkeypatch):
    import evaluate
    calls = []                                                  # each call: (originals' ids, counterfactuals' ids)
    monkeypatch.setattr(evaluate, "frechet_distance", lambda a, b: calls.append((a[:, 0], b[:, 0] - 1000)) or
                        len(calls))
    n = 11
    f_x = np.stack([np.arange(n), np.zeros(n)], 1)             # row i of the originals says i; of the cfs, 1000 + i
    assert split_fd(f_x, f_x + [1000, 0], seed=3) == 1.5        # the mean of the two distances (1 and 2)
    (orig_a, cf_b), (orig_b, cf_a) = [(set(o.astype(int)), set(c.astype(int))) for o, c in calls]
    assert orig_a == cf_a and orig_b == cf_b                    # originals of one half against cfs of the other
    assert not orig_a & orig_b and orig_a | orig_b == set(range(n)) and {len(orig_a), len(orig_b)} == {5, 6}
    calls.clear()
    split_fd(f_x, f_x + [1000, 0], seed=4)
    assert set(calls[0][0].astype(int)) != orig_a               # the seed picks the split


def test_correlation_difference():
    labels = torch.tensor([[0, 0, 0], [0, 0, 1], [1, 1, 0], [1, 1, 1]])        # corr(a0, .) = 1, 1, 0
    d0 = torch.tensor([1, 1, -1, -1])

    def decisions(*deltas):                            # before/after decisions whose changes are ``deltas``
        d = torch.stack(deltas, 1)
        return (d < 0).long(), (d > 0).long()
    assert correlation_difference(labels, *decisions(d0, d0, torch.tensor([1, -1, 1, -1])), k=0) == pytest.approx(0)
    # attribute 1 never changes (a constant column: NaN counts as 0), attribute 2 changes against the target
    assert correlation_difference(labels, *decisions(d0, 0 * d0, -d0), k=0) == pytest.approx(2)
    # attribute 2 is uncorrelated in the data but moves with the target here: |0 - 1| counts as 1, not -1
    assert correlation_difference(labels, *decisions(d0, d0, d0), k=0) == pytest.approx(1)


def test_cout_on_built_cases():
    prob = lambda b: torch.sigmoid(50 * b[:, 0, 0, 0])        # a classifier that reads one pixel
    x = torch.zeros(2, 3, 10, 10)
    x[0, 0, 0, 0], x[1, 0, 0, 0] = -1, 1                       # predicted 0 and 1
    x_cf = x.clone()
    x_cf[:, 0, 0, 0] *= -1                                     # the most changed pixel flips the classifier
    x_cf[:, 0, 5:, :] += 0.1
    # 100 pixels, 2 per step: after the first step p_c = 0, so AUC(p_c) = 0.5 * 0.02 and COUT = 1 - 2 * 0.01
    assert cout(prob, x, x_cf) == pytest.approx(0.98, abs=1e-6)
    y = torch.zeros(1, 3, 8, 8) - 1
    y_cf = y + 1                                               # every pixel moves by 1 per channel (3 in all) ...
    y_cf[0, :, 0, 0] = torch.tensor([1.0, -1.0, -1.0])         # ... the classifier's by 2 in all: inserted last
    assert cout(prob, y, y_cf) == pytest.approx(1 - 2 * (63 / 64 + 0.5 / 64), abs=1e-6)
    y_cf[0, 0, 0, 0] = -1                                      # never changed: p_c stays 1
    assert cout(prob, y, y_cf) == pytest.approx(-1, abs=1e-6)


@pytest.fixture
def no_inception(tmp_path, monkeypatch):
    """A torchmetrics that cannot be imported, as where only requirements.txt is installed."""
    (tmp_path / "hide" / "torchmetrics").mkdir(parents=True)
    (tmp_path / "hide" / "torchmetrics" / "__init__.py").write_text("raise ModuleNotFoundError('hidden')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "hide"))


def check_fallback(proc, report, md):
    notes = [ln for ln in proc.stdout.splitlines() if ln.startswith("note: no Inception-v3")]
    assert len(notes) == 1 and "FD (oracle features)" in notes[0], proc.stdout[-2000:]
    assert report["features"] == "FD (oracle features)"
    header = md.splitlines()[2]                                 # the title, a blank line, the table's header
    assert "FD (oracle features)" in header and "FID" not in header


def test_counterfactuals_job(toy_run, tmp_path, no_inception):
    out, _ = toy_run
    # DPM-Solver++ with 10 steps over T = 100 from strength 0.5 (t0 = 49): ceil(10 * 50 / 100) = 5 network calls,
    # one guide gradient each; one rung and no localisation, so 5 and 5 per counterfactual
    proc = run("evaluate.py", "counterfactuals", "--run_dir", out, "--n", 4, "--sampler", "dpmpp2m", "--steps", 10,
               "--strength", 0.5, "--no_localize", "--guidance_scale", 1, "--device", "cpu", "--out", tmp_path / "ev")
    assert_ok(proc)
    report = json.loads((tmp_path / "ev/counterfactuals.json").read_text())
    md = (tmp_path / "ev/counterfactuals.md").read_text()
    check_fallback(proc, report, md)
    rows = report["rows"]
    assert set(rows) == {"toward 1", "toward 0", "pooled"}
    for name in ("toward 1", "toward 0"):
        r = rows[name]
        assert r["n"] == 4 and r["unet_calls"] == 5 and r["guide_grads"] == 5
        assert 0 <= r["flip_rate_oracle"] <= 1 and 0 <= r["mnac"] <= 4 and -1 <= r["cout"] <= 1
        assert 0 < r["l1_mean"] < 1 and 0 < r["l1_to_exact"] < 1 and "fd" not in r and "cd" not in r   # pooled only
        assert abs(r["l1_to_exact"] - r["l1_mean"]) > 1e-4     # the redraw with the attribute changed is not the input
    pooled = rows["pooled"]
    assert pooled["n"] == 8 and pooled["unet_calls"] == 5 and pooled["fd"] > 0 and np.isfinite(pooled["sfd"])
    assert pooled["cd"] >= 0
    assert pooled["flip_rate_guide"] == pytest.approx((rows["toward 1"]["flip_rate_guide"]
                                                       + rows["toward 0"]["flip_rate_guide"]) / 2)
    assert "| pooled | 8 |" in md and "sFD (oracle features)" in md and "DiME" in md and md in proc.stdout


def test_fid_job(toy_run, tmp_path, no_inception):
    run_dir = tmp_path / "run"                         # the tiny run's checkpoints, so that its eval/ lands here
    run_dir.mkdir()
    for f in ("diffusion_final.pth", "classifier_best.pth", "oracle_best.pth"):
        (run_dir / f).symlink_to(toy_run[0] / f)
    proc = run("evaluate.py", "fid", "--run_dir", run_dir, "--num_samples", 6, "--steps", 4, "--device", "cpu")
    assert_ok(proc)
    report, md = json.loads((run_dir / "eval/fid.json").read_text()), (run_dir / "eval/fid.md").read_text()
    check_fallback(proc, report, md)
    assert report["rows"]["unguided"]["n_samples"] == 6 and report["rows"]["unguided"]["fd"] > 0
    assert report["rows"]["unguided"]["n_test"] > 6 and f"wrote {run_dir / 'eval/fid.json'}" in proc.stdout


def test_failed_inception_download_falls_back(monkeypatch, capsys):
    inception = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3",
                                    reason="torch-fidelity (requirements-eval.txt) is not installed")
    pytest.importorskip("torchmetrics", reason="torchmetrics (requirements-eval.txt) is not installed")
    from urllib.error import URLError
    import evaluate

    def offline(*args, **kwargs):
        raise URLError("no network")
    monkeypatch.setattr(inception, "load_state_dict_from_url", offline)
    oracle = SimpleNamespace(features=lambda x: x.mean((2, 3)))
    fn, label = evaluate.feature_net(SimpleNamespace(device=torch.device("cpu"), oracle=oracle), None)
    assert fn is oracle.features and label == "FD (oracle features)"
    note = capsys.readouterr().out.strip()
    assert note.count("\n") == 0 and note.startswith("note: no Inception-v3 (URLError") and "not FID" in note


@pytest.mark.parametrize("extra, fragments", [
    (["fid", "--run_dir", "nowhere"], ["--run_dir", "nowhere"]),
    (["fid", "--run_dir", "."], ["diffusion_final.pth"]),
    (["counterfactuals", "--n", "1"], ["--n"]),
    (["fid", "--batch_size", "0"], ["--batch_size"]),
    (["counterfactuals", "--strength", "2"], ["--strength"]),
    (["counterfactuals", "--guidance_scale", "nan"], ["--guidance_scale"]),
    (["counterfactuals", "--guidance_scale", "30", "60", "30"], ["--guidance_scale 30 60 30 repeats a scale"]),
    (["fid", "--out", "ev"], ["ev/fid.md' is a folder"]),                  # refused before the work, not after
    (["fid", "--guidance_scale", "3"], ["--target_label"]),
    (["fid", "--fid_weights", "missing.pth"], ["--fid_weights"]),
    (["fid", "--fid_weights", "junk.pth"], ["--fid_weights"]),
    (["fid", "--steps", "1000"], ["--steps", "100"]),
    (["fid", "--no_localize"], ["--no_localize"]),
    (["ssim"], ["ssim"]),
])
def test_bad_input(toy_run, tmp_path, extra, fragments, capsys, monkeypatch):
    out, _ = toy_run
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    (tmp_path / "ev" / "fid.md").mkdir(parents=True)
    args = extra + ([] if "--run_dir" in extra or extra == ["ssim"] else ["--run_dir", out])
    files = lambda: sorted(p for p in out.rglob("*")) + sorted(tmp_path.rglob("*"))
    before = files()
    proc = run_here("evaluate.py", *args, "--device", "cpu", cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    assert_user_error(proc, *fragments)
    assert files() == before                                    # nothing written, not even an empty folder
