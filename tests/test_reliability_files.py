"""Nothing allocates from a file: every head or checkpoint file (ours, single files, the authors' names, torch's zip
and legacy formats) has what it declares checked before any tensor is materialised or any model built. Crafted
files of a few KB (stride-0 views, large declared shapes, deflate bombs inside torch's zip, storages longer than
the file) are refused, and the process's peak memory stays near that of loading a real head."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from heinsen_replication import checkpoints, models
from heinsen_replication.errors import UsageError
from heinsen_replication.pretrained import MAX_FILE_BYTES, inspect_torch_file, torch_load_safely
from tests.helpers.files import PUBLISHED_2019

REPO_ROOT = Path(__file__).resolve().parents[1]
AUTHORS_NAME = 'pretrained_sst5_head_for_roberta-large.state_dict'


def stride0_head(path, d_depth=25, d_emb=1024, n_classes=5):
    """A RoutingHead state dict of roberta-large's shapes whose every tensor is a stride-0 view of one element: a
    few KB on disk, 19 MiB as a real head, and gigabytes with the shapes below scaled up."""
    with torch.device('meta'):
        shapes = {k: v.shape for k, v in models.RoutingHead(d_depth, d_emb, n_classes).state_dict().items()}
    torch.save({k: torch.zeros(1).expand(s) for k, s in shapes.items()}, path)
    return path


def peak_rss_mib(path):
    """Load path with checkpoints.from_pretrained in a fresh process -> (its peak resident memory in MiB, the
    error's text or 'loaded')."""
    code = ("import resource, sys\nfrom heinsen_replication import checkpoints\n"
            "try:\n    checkpoints.from_pretrained(sys.argv[1]); what = 'loaded'\n"
            "except Exception as e:\n    what = f'{type(e).__name__}: {e}'\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024); print(what)")
    out = subprocess.run([sys.executable, '-c', code, str(path)], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0 and len(lines) >= 2, out.stderr
    return int(lines[0]), '\n'.join(lines[1:])


@pytest.mark.slow                                          # two fresh processes
def test_a_few_kb_crafted_head_keeps_peak_memory_near_a_real_heads(tmp_path):
    real = tmp_path / 'real' / AUTHORS_NAME
    real.parent.mkdir()
    torch.save(models.RoutingHead(25, 1024, 5).state_dict(), real)
    crafted = tmp_path / 'crafted' / AUTHORS_NAME
    crafted.parent.mkdir()
    stride0_head(crafted, d_emb=1 << 16)                   # 25 x 65536: tens of GB if materialised
    assert os.path.getsize(crafted) < 20_000
    real_peak, real_what = peak_rss_mib(real)
    crafted_peak, crafted_what = peak_rss_mib(crafted)
    assert real_what == 'loaded'
    assert 'UsageError' in crafted_what and 'crafted view' in crafted_what and '\n' not in crafted_what
    assert crafted_peak < real_peak + 50, (crafted_peak, real_peak)


@pytest.mark.parametrize('name', [AUTHORS_NAME, 'head.pt', 'sst5_head_for_roberta-large_epoch3.checkpoint'])
def test_stride0_views_are_refused_before_anything_is_materialised(tmp_path, name, monkeypatch):
    path = tmp_path / name
    if name.endswith('.checkpoint'):
        stride0_head(tmp_path / 'w.pt')
        torch.save({'weights': torch.load(tmp_path / 'w.pt', weights_only=True)}, path)
    else:
        stride0_head(path)
    forbid_building(monkeypatch)
    with pytest.raises(UsageError, match=r"tensor '.*W' declares shape \(25, 1024\) with strides \(0, 0\) over a "
                                         r"storage of 1 elements"):
        checkpoints.from_pretrained(path)


def test_a_single_safetensors_head_with_a_large_declared_width_is_refused_before_building(tmp_path, monkeypatch):
    """A head whose W declares a width the other tensors do not have: the model it describes is never built."""
    path = tmp_path / 'head.safetensors'
    state = models.RoutingHead(3, 8, 2, n_hid=4).state_dict()
    state['W'] = torch.zeros(3, 1 << 18)
    save_file(state, path)
    forbid_building(monkeypatch)
    with pytest.raises(UsageError) as e:
        checkpoints.from_pretrained(path)
    message = str(e.value)
    assert "does not hold the RoutingHead its tensors' shapes describe: shapes B (3, 8) (expected (3, 262144))" \
        in message and '\n' not in message


def forbid_building(monkeypatch):
    """A RoutingHead may be built on the meta device only (where the checks build it): nothing allocated."""
    init = models.RoutingHead.__init__

    def meta_only(self, *args, **kwargs):
        if torch.get_default_device().type != 'meta':
            pytest.fail('a model was built before the file was refused')
        init(self, *args, **kwargs)
    monkeypatch.setattr(models.RoutingHead, '__init__', meta_only)


def rewrite_zip(path, replace, compress=zipfile.ZIP_STORED):
    """Rewrite torch's zip at path with some records' bytes replaced ({name suffix: bytes}), compressed as asked."""
    with zipfile.ZipFile(path) as z:
        records = [(i.filename, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(path, 'w') as z:
        for name, content in records:
            new = next((v for k, v in replace.items() if name.endswith(k)), None)
            z.writestr(name, content if new is None else new, compress_type=compress if new is not None else 0)


@pytest.mark.parametrize('record', ['data/0', 'data.pkl'])
def test_a_deflate_bomb_inside_torchs_zip_is_never_decompressed(tmp_path, record, monkeypatch):
    path = tmp_path / 'head.pt'
    torch.save(models.RoutingHead(3, 8, 2, n_hid=4).state_dict(), path)
    with zipfile.ZipFile(path) as z:
        pickle_bytes = z.read(next(n for n in z.namelist() if n.endswith('data.pkl')))
    content = pickle_bytes + b'\0' * (64 << 20) if record == 'data.pkl' else b'\0' * (64 << 20)
    rewrite_zip(path, {record: content}, compress=zipfile.ZIP_DEFLATED)
    assert os.path.getsize(path) < 200_000
    monkeypatch.setattr(zipfile.ZipFile, 'read', lambda *a, **k: pytest.fail('a record was decompressed'))
    with pytest.raises(UsageError, match=rf"holds compressed records \(.*{record}\), which torch.save never writes"):
        checkpoints.from_pretrained(path)


def test_a_storage_longer_than_its_record_is_refused(tmp_path):
    path = tmp_path / 'head.pt'
    torch.save({'W': torch.zeros(4, 4)}, path)
    rewrite_zip(path, {'data/0': b'\0' * 8})
    with pytest.raises(UsageError, match=r"storage 0 declares 16 elements of torch.float32 but its record holds 8 "
                                         r"bytes"):
        inspect_torch_file(str(path))


def test_a_legacy_file_declaring_more_than_it_holds_is_refused(tmp_path):
    """The legacy format (the authors' 2019 files): torch.load allocates each storage's declared size before
    reading it; the declared sizes are checked against the file first."""
    path = tmp_path / 'legacy.pt'
    torch.save({'W': torch.zeros(1000)}, path, _use_new_zipfile_serialization=False)
    content = path.read_bytes()
    path.write_bytes(content[:-2000])                              # half of the storage's bytes
    with pytest.raises(UsageError, match='ends inside storage'):
        torch_load_safely(str(path))


def test_files_larger_than_the_ceiling_are_refused_before_reading(tmp_path, monkeypatch):
    path = tmp_path / 'head.pt'
    torch.save({'W': torch.zeros(4)}, path)
    monkeypatch.setattr(os.path, 'getsize', lambda p: MAX_FILE_BYTES + 1)
    monkeypatch.setattr(torch, 'load', lambda *a, **k: pytest.fail('read'))
    with pytest.raises(UsageError, match='more than any head or checkpoint of this repository'):
        checkpoints.from_pretrained(path)


@pytest.mark.skipif(PUBLISHED_2019 is None, reason="the authors' 2019 files are not here")
def test_the_authors_2019_files_declare_what_they_hold():
    for name in ('SST5R_pretrained_model_state_dict.pt', 'smallNORB_pretrained_model_state_dict.pt'):
        declared = inspect_torch_file(str(PUBLISHED_2019 / name))
        loaded = torch_load_safely(str(PUBLISHED_2019 / name))
        assert {k: (v.shape, v.dtype) for k, v in declared.items()} == {k: (v.shape, v.dtype)
                                                                         for k, v in loaded.items()}
        assert all(v.device.type == 'meta' for v in declared.values())
