import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread_and_seed():
    # Tests run on a 2-core machine, often beside other work: one intra-op thread, fixed seed.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _no_user_data_folder(monkeypatch):
    # The data tests set where files are looked up themselves; a NORMLAB_DATA of the user's must not leak in.
    monkeypatch.delenv("NORMLAB_DATA", raising=False)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    # Tests never touch the network: any download attempt fails loudly.
    import urllib.request

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to download something")

    monkeypatch.setattr(urllib.request, "urlretrieve", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
