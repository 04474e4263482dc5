"""Feature-cache builds that are interrupted give the features of an uninterrupted build, bit for bit, and a writer
that is suspended blocks nobody forever: the wait is bounded and names the writer's process."""
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from filelock import FileLock

from heinsen_replication import backbones, data
from heinsen_replication.errors import UsageError

REPO_ROOT = Path(__file__).resolve().parents[1]
WORDS = 'the film is good bad fine awful great dull long short funny sad a it was not very'.split()
TEXTS = [' '.join(WORDS[(7 * i + 3 * k) % len(WORDS)] for k in range(2 + i % 9)) + f' {i}' for i in range(60)]


class BatchDependent(nn.Module):
    """A backbone model whose hidden states move with the number of sequences in its batch, as kernels whose
    rounding depends on the batch's size may (GPU matrix products): a feature that depended on how a build's
    batches were composed would differ here by far more than a float16 step."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, input_ids, **inputs):
        states = self.model(input_ids=input_ids, **inputs).hidden_states
        return types.SimpleNamespace(hidden_states=tuple(h + 0.01 * len(input_ids) for h in states))


@pytest.fixture(scope='module')
def batch_dependent(tiny_bert):
    bert = backbones.load_backbone(tiny_bert)
    return backbones.TextBackbone(BatchDependent(bert.model), bert.tokenizer, 'batch-dependent')


def rows_by_text(store, texts):
    dataset = store.dataset(texts, [0] * len(texts))
    return {t: dataset[i][0] for i, t in enumerate(texts)}


def interrupted_build(store, texts, after_blocks, monkeypatch):
    """store.ensure(texts) stopped (as by a kill) after `after_blocks` blocks were stored."""
    real, calls = store.backbone.encode_rows, []

    def stops(*args, **kwargs):
        calls.append(1)
        if len(calls) > after_blocks:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(store.backbone, 'encode_rows', stops)
    with pytest.raises(KeyboardInterrupt):
        store.ensure(texts, batch_texts=8)
    monkeypatch.undo()


@pytest.mark.parametrize('first', ['the same texts', 'a subset (another dataset sharing texts)'])
@pytest.mark.parametrize('after_blocks', [1, 2])
def test_an_interrupted_build_gives_the_rows_of_an_uninterrupted_one(batch_dependent, tmp_path, monkeypatch, first,
                                                                      after_blocks):
    monkeypatch.setattr(data.FeatureStore, 'SAVE_EVERY_SECONDS', 0)          # the index after every block
    reference = data.FeatureStore(str(tmp_path / 'reference'), batch_dependent)
    reference.ensure(TEXTS, batch_texts=8)
    expected = rows_by_text(reference, TEXTS)

    store = data.FeatureStore(str(tmp_path / 'cache'), batch_dependent)
    interrupted = TEXTS if first == 'the same texts' else TEXTS[::3]
    interrupted_build(store, interrupted, after_blocks, monkeypatch)
    stored_before = set(data.FeatureStore(str(tmp_path / 'cache'), batch_dependent).index['texts'])
    assert 0 < len(stored_before) < len(interrupted)
    resumed = data.FeatureStore(str(tmp_path / 'cache'), batch_dependent)
    resumed.ensure(TEXTS, batch_texts=8)
    got = rows_by_text(resumed, TEXTS)
    # every text this build encoded has the rows of the uninterrupted build; those an interrupted build of the same
    # texts stored too (a build of other texts computed its own in its own batches)
    compared = TEXTS if first == 'the same texts' else [t for t in TEXTS if t not in stored_before]
    different = [t for t in compared if not torch.equal(got[t], expected[t])]
    assert not different, different[:3]


KILLED_BUILD = """
import sys, time, torch
from heinsen_replication import backbones, data
from heinsen_replication.errors import UsageError
data.FeatureStore.SAVE_EVERY_SECONDS = 0
backbone = backbones.load_backbone(sys.argv[2])
real = backbone.encode_rows
def slow(*args, **kwargs):
    time.sleep(0.05)
    return real(*args, **kwargs)
backbone.encode_rows = slow
texts = [line for line in open(sys.argv[3], encoding='utf-8').read().split('\\n') if line]
store = data.FeatureStore(sys.argv[1], backbone)
print('started', flush=True)
store.ensure(texts, batch_texts=4)
"""


@pytest.mark.slow                                           # builds in subprocesses, killed
def test_kill_9_during_builds_leaves_features_bit_identical(tiny_bert, tmp_path):
    texts = TEXTS * 1 + [t + ' again' for t in TEXTS]
    (tmp_path / 'texts.txt').write_text('\n'.join(texts), encoding='utf-8')

    def build(cache, kill_after=None):
        process = subprocess.Popen([sys.executable, '-c', KILLED_BUILD, str(cache), tiny_bert,
                                    str(tmp_path / 'texts.txt')], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == 'started'
        if kill_after is None:
            assert process.wait(timeout=300) == 0
            return
        time.sleep(kill_after)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)

    build(tmp_path / 'reference')
    for seconds in (0.3, 0.7, 0.2):                         # several kills at different points
        build(tmp_path / 'cache', kill_after=seconds)
    build(tmp_path / 'cache')
    bert = backbones.load_backbone(tiny_bert)
    expected = rows_by_text(data.FeatureStore(str(tmp_path / 'reference'), bert), texts)
    got = rows_by_text(data.FeatureStore(str(tmp_path / 'cache'), bert), texts)
    assert all(torch.equal(got[t], expected[t]) for t in texts)


# -----------------------------------------------------------------------------
# a suspended writer


def test_a_stopped_writer_is_waited_for_a_bounded_time_naming_its_process(tiny_bert, tmp_path, monkeypatch, capsys):
    bert = backbones.load_backbone(tiny_bert)
    store = data.FeatureStore(str(tmp_path / 'cache'), bert)
    held = FileLock(os.path.join(store.folder, '.lock'))               # another writer, stopped while it holds it
    held.acquire()
    data.write_atomic(os.path.join(store.folder, '.lock.holder'),
                      json.dumps({'pid': 4242, 'command': 'train.py --dataset_name imdb'}).encode())
    monkeypatch.setattr(data.features, '_process_state', lambda pid: 'T' if pid == 4242 else None)
    monkeypatch.setattr(data.FeatureStore, 'STOPPED_SECONDS', 1)
    started = time.monotonic()
    with pytest.raises(UsageError, match=r"process 4242 \(train.py --dataset_name imdb\) holds its lock and has "
                                           r"been stopped .* resume it \(kill -CONT 4242\) or end it"):
        store.ensure(['a new text'])
    assert time.monotonic() - started < 10
    assert 'process 4242 (train.py --dataset_name imdb) is writing it; waiting' in capsys.readouterr().out
    monkeypatch.setattr(data.FeatureStore, 'WAIT_SECONDS', 1)          # one that runs: bounded too
    monkeypatch.setattr(data.features, '_process_state', lambda pid: 'R')
    with pytest.raises(UsageError, match=r"process 4242 .* has held its lock for all the"):
        store.ensure(['a new text'])
    held.release()
    store.ensure(['a new text'])                                       # released: the store goes on


HOLDS_THE_LOCK = """
import sys, time
from heinsen_replication import backbones, data
from heinsen_replication.errors import UsageError
store = data.FeatureStore(sys.argv[1], backbones.load_backbone(sys.argv[2]))
with store._locked():
    print('holding', flush=True)
    time.sleep(600)
"""


@pytest.mark.slow                                           # a writer in a subprocess, suspended with SIGSTOP
def test_a_writer_suspended_with_sigstop_is_named_and_not_waited_for_forever(tiny_bert, tmp_path, monkeypatch):
    writer = subprocess.Popen([sys.executable, '-c', HOLDS_THE_LOCK, str(tmp_path / 'cache'), tiny_bert],
                              cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == 'holding'
        os.kill(writer.pid, signal.SIGSTOP)
        monkeypatch.setattr(data.FeatureStore, 'STOPPED_SECONDS', 2)
        started = time.monotonic()
        with pytest.raises(UsageError, match=rf"process {writer.pid} \(.*\) holds its lock and has been stopped"):
            data.FeatureStore(str(tmp_path / 'cache'), backbones.load_backbone(tiny_bert))
        assert time.monotonic() - started < 20
    finally:
        os.kill(writer.pid, signal.SIGCONT)
        writer.kill()
        writer.wait()
