"""Session fixtures: one tiny training run on toyfaces and one on a fake CelebA, shared by the test files."""
import pytest

from fakes import TINY, assert_ok, make_celeba, run


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory):
    """One tiny toyfaces training run: 16x16, a few steps per stage."""
    out = tmp_path_factory.mktemp("toy_run")
    proc = run("train.py", "--dataset", "toyfaces", *TINY, "--classifier_epochs", 2, "--oracle_epochs", 1,
               "--diffusion_epochs", 2, "--max_steps_per_epoch", 4, "--subset_fraction", 0.02, "--save_every", 1,
               "--sample_every", 1, "--output_dir", out)
    assert_ok(proc)
    return out, proc


@pytest.fixture(scope="session")
def celeba_run(tmp_path_factory):
    """One tiny run on a fake CelebA folder (official layout)."""
    data = tmp_path_factory.mktemp("celeba_data")
    make_celeba(data, "official", n=60)
    out = tmp_path_factory.mktemp("celeba_run")
    proc = run("train.py", "--data_root", data, *TINY, "--classifier_epochs", 1, "--oracle_epochs", 1,
               "--diffusion_epochs", 1, "--subset_fraction", 1.0, "--batch_size", 8, "--output_dir", out)
    assert_ok(proc)
    return data, out, proc
