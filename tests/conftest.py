import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)  # tiny tensors: threads only add overhead (and oversubscribe a shared box)


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory):
    import tiny
    return tiny.make_sd_folder(tmp_path_factory.mktemp("sd") / "model")


@pytest.fixture(scope="session")
def sd2v_folder(tmp_path_factory):
    import tiny
    return tiny.make_sd_folder(tmp_path_factory.mktemp("sd2") / "model", prediction_type="v_prediction", linear=True)


@pytest.fixture(scope="session")
def sdxl_folder(tmp_path_factory):
    import tiny
    return tiny.make_sdxl_folder(tmp_path_factory.mktemp("sdxl") / "model")


@pytest.fixture(scope="session")
def refiner_folder(tmp_path_factory):
    import tiny
    return tiny.make_sdxl_folder(tmp_path_factory.mktemp("refiner") / "model", refiner=True)
