"""
The feature store and batching of text features.

    FeatureStore(cache, backbone)    a frozen backbone's hidden states of every text, computed once, memory-mapped
    CachedFeatures                   a Dataset of (hidden [n_pos, d_depth, d_emb], label) read from a store
    pad_positions(sequences)         zero-pad a list of [n_pos_b, ...] tensors -> (hidden, mask)
    collate_features(batch)          pad_positions for a DataLoader -> (hidden, mask, labels)
    LengthGroupedBatchSampler        batches of similar lengths (less padding)

Imports data.fileio only (never models: models imports pad_positions from here).
"""

import bisect
import errno
import hashlib
import json
import os
import shlex
import time

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import UsageError
from .fileio import write_atomic

# -----------------------------------------------------------------------------
# Feature store: a frozen backbone's hidden states of every text, computed once, memory-mapped.
# The backbone never changes, so heads can train from these instead of running it every step.


def tokenizer_settings(tokenizer) -> dict:
    """The settings of a transformers tokenizer that change what it encodes, beyond its vocabulary and rules:
    padding and truncation side, its special tokens, and its init_kwargs (lower-casing, accents, added tokens,
    ...), less file paths. Plain JSON types (tokens as strings)."""
    if tokenizer is None:
        return {}
    init = {k: v for k, v in getattr(tokenizer, 'init_kwargs', {}).items()
            if not k.endswith('_file') and k not in ('name_or_path', 'is_local', 'local_files_only', 'cache_dir',
                                                     'token', 'use_auth_token', 'revision', 'padding_side',
                                                     'truncation_side')}  # the last two: their values in use, below
    settings = {'padding_side': getattr(tokenizer, 'padding_side', None),
                'truncation_side': getattr(tokenizer, 'truncation_side', None),
                'special_tokens': {k: str(v) for k, v in getattr(tokenizer, 'special_tokens_map', {}).items()},
                'init_kwargs': init}
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def backbone_fingerprint(backbone) -> dict:
    """What determines a text backbone's features, hashed: its weights (every tensor of the state dict),
    its config (less its path), its tokenizer (the full tokenizers JSON, or the vocabulary) and the tokenizer's
    settings (tokenizer_settings: padding and truncation side, special tokens, init arguments), the window
    (max_length), the hub revision it resolved to (and the one asked for), and the versions of the libraries
    that tokenise. -> {'weights', 'config', 'tokenizer', 'tokenizer_settings': sha256 hex, 'max_length',
    'revision', 'requested_revision', 'transformers', 'tokenizers'}"""
    import transformers
    try:
        import tokenizers
        tokenizers_version = tokenizers.__version__
    except ImportError:
        tokenizers_version = None
    model = backbone.model
    weights = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        weights.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        weights.update(t.reshape(-1).view(torch.uint8).numpy())
    config = getattr(model, 'config', None)
    config_dict = {} if config is None else {k: v for k, v in config.to_dict().items()
                                               if k not in ('_name_or_path', 'transformers_version')}
    tokenizer = getattr(backbone, 'tokenizer', None)
    if tokenizer is None:
        tokenizer_text = ''
    elif getattr(tokenizer, 'backend_tokenizer', None) is not None:
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        spec.pop('truncation', None), spec.pop('padding', None)   # call settings, changed by every encode()
        tokenizer_text = type(tokenizer).__name__ + json.dumps(spec, sort_keys=True)
    else:
        tokenizer_text = type(tokenizer).__name__ + json.dumps(tokenizer.get_vocab(), sort_keys=True)
    sha = lambda text: hashlib.sha256(text.encode()).hexdigest()                    # noqa: E731
    return {'weights': weights.hexdigest(), 'config': sha(json.dumps(config_dict, sort_keys=True, default=str)),
            'tokenizer': sha(tokenizer_text),
            'tokenizer_settings': sha(json.dumps(tokenizer_settings(tokenizer), sort_keys=True)),
            'max_length': getattr(backbone, 'max_length', None),
            'revision': getattr(config, '_commit_hash', None),
            'requested_revision': getattr(backbone, 'revision', None),
            'transformers': transformers.__version__, 'tokenizers': tokenizers_version}


def rows_checksum(text: str, rows) -> str:
    """The checksum of one text's rows in hidden.f16 (sha256 of the text and the rows' bytes, 16 hex digits):
    flipped bits, NaN written over rows and rows swapped between texts all change it."""
    h = hashlib.sha256(text.encode('utf-8', 'surrogatepass'))
    h.update(b'\x00')
    h.update(memoryview(np.ascontiguousarray(rows)).cast('B'))
    return h.hexdigest()[:16]


def damaged(folder, why):
    """The error of a damaged feature cache: what is wrong, and the command that rebuilds it."""
    return UsageError(f"feature cache {folder} is damaged: {why}. Rebuild it: rm -r {shlex.quote(folder)} and run "
                      f"the same command again (the features are encoded anew; or pass another --feature_cache)")


class FeatureStore:
    """
    Hidden states of all depths of one frozen text backbone for every text ever asked for, stored
    once as float16 and read back memory-mapped. Texts are keys, so datasets that share texts (SST-5
    and SST-2) share features. The store lives in cache/<backbone name, '/' -> '--'>/<key>/ (`folder`), key = a
    hash of the store's FORMAT and backbone_fingerprint (weights, config, tokenizer and its settings, max_length,
    revision, library versions) and of the precision the backbone runs in (its autocast_dtype): other weights,
    another revision, another tokenizer setting or another precision of the same backbone name get their own
    features. Layout of the folder:

        hidden.f16   float16 [n_rows, d_depth, d_emb], one row per non-padding token, append-only
        index.json   {'format', 'backbone', 'd_depth', 'd_emb', 'max_length', 'fingerprint', 'autocast_dtype',
                      'n_rows', 'texts': {text: [start, length, checksum]}}, checksum = rows_checksum(text, its rows)
        .lock        a file lock (filelock): one process at a time appends rows and rewrites the index

    Nothing is lost on interruption: rows are appended and fsynced before index.json (written
    atomically) points at them, and rows past the index's n_rows (a partial tail) are dropped on
    the next open, so encoding resumes where the last saved index ends. Several processes (runs side
    by side, or the ranks of `accelerate launch`) may share a store: writers take the lock and re-read
    the index first, so no row is written twice or pointed at by another text.

    Nothing damaged is read as features: a hidden.f16 shorter than its index (truncated or deleted) or an
    unreadable index.json is refused on opening; each text's rows are checked against its checksum when they
    are read (CachedFeatures), so flipped bits, NaN written over rows or rows swapped between texts are refused
    naming the text; features that are not finite in float16 are refused when they are encoded. Every such
    error names the folder and the command that rebuilds it. A disk that is full or read-only while the store
    is written is a clear OSError naming the folder; what was stored before is kept.
    """

    FORMAT = 2                 # 2: per-text checksums in the index (format 1, without them, is never read)
    SAVE_EVERY_SECONDS = 60

    def __init__(self, cache, backbone):
        from filelock import FileLock
        self.backbone = backbone
        fingerprint = backbone_fingerprint(backbone)
        # the precision the backbone runs in (FrozenBackbone.autocast_dtype; None = float32)
        autocast = getattr(backbone, 'autocast_dtype', None)
        autocast = None if autocast is None else str(autocast).replace('torch.', '')
        key = [self.FORMAT, backbone.name, backbone.d_depth, backbone.d_emb, fingerprint, autocast]
        self.key = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        self.folder = os.path.join(cache, backbone.name.replace('/', '--'), self.key[:16])
        self.hidden_path = os.path.join(self.folder, 'hidden.f16')
        self.index_path = os.path.join(self.folder, 'index.json')
        self.meta = {'format': self.FORMAT, 'backbone': backbone.name, 'd_depth': backbone.d_depth,
                     'd_emb': backbone.d_emb, 'max_length': getattr(backbone, 'max_length', None),
                     'fingerprint': fingerprint, 'autocast_dtype': autocast}
        self.row_bytes = 2 * backbone.d_depth * backbone.d_emb
        with _disk_errors(self.folder):
            os.makedirs(self.folder, exist_ok=True)
            self.lock = FileLock(os.path.join(self.folder, '.lock'))
            with self._locked():
                self._load()

    def _locked(self):
        from filelock import Timeout
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            print(f"feature cache {self.folder}: another process is writing it; waiting for it to finish")
            self.lock.acquire()
        return _Release(self.lock)

    def _damaged(self, why):
        return damaged(self.folder, why)

    def _load(self):
        """(Re-)read the index, validate it against the backbone and hidden.f16, drop a partial tail (under the lock)."""
        index = {**self.meta, 'n_rows': 0, 'texts': {}}
        if os.path.exists(self.index_path):
            try:
                with open(self.index_path, encoding='utf-8') as f:
                    index = json.load(f)
                if not isinstance(index, dict) or not isinstance(index.get('texts'), dict) \
                        or not isinstance(index.get('n_rows'), int) or index['n_rows'] < 0:
                    raise ValueError("expected {'n_rows': int, 'texts': {text: [start, length, checksum]}, ...}")
            except (ValueError, UnicodeDecodeError) as e:          # json.JSONDecodeError is a ValueError
                raise self._damaged(f"{self.index_path} is not a valid index ({e})") from None
            stored = {k: index.get(k) for k in self.meta}
            if stored != self.meta:
                raise UsageError(f"feature cache {self.folder} holds features of {stored}, not of {self.meta}: "
                                 f"use another --feature_cache folder")
            n_rows = index['n_rows']
            for text, span in index['texts'].items():
                if not (isinstance(span, list) and len(span) == 3 and all(isinstance(v, int) for v in span[:2])
                        and isinstance(span[2], str) and span[0] >= 0 and span[1] >= 0 and span[0] + span[1] <= n_rows):
                    raise self._damaged(f"{self.index_path} points {text[:40]!r} at {span}, not [start, length, "
                                        f"checksum] within its {n_rows} rows")
        needed = index['n_rows'] * self.row_bytes
        size = os.path.getsize(self.hidden_path) if os.path.exists(self.hidden_path) else 0
        if size < needed:
            raise self._damaged(f"{self.hidden_path} holds {size} bytes but index.json points at {index['n_rows']} "
                                f"rows ({needed} bytes): the file was truncated or deleted")
        if size > needed or not os.path.exists(self.hidden_path):
            with open(self.hidden_path, 'ab') as f:                  # drop a partial tail, if any
                f.truncate(needed)
        self.index = index

    def _save_index(self):
        write_atomic(self.index_path, json.dumps(self.index).encode())

    BLOCK_BYTES = 256 << 20

    def ensure(self, texts, desc='', batch_texts=4096):
        """Encodes (with the backbone) the texts not stored yet, in blocks of at most batch_texts texts and
        BLOCK_BYTES of rows, the texts ordered by their number of tokens (so that the backbone's equal-length
        batches are full, see TextBackbone.encode_rows)."""
        if not set(texts) - set(self.index['texts']):
            return
        with _disk_errors(self.folder), self._locked():
            self._load()                                             # another process may have added some
            self._append(sorted(set(texts) - set(self.index['texts'])), desc, batch_texts)

    def _append(self, missing, desc, batch_texts):
        from tqdm import tqdm
        if not missing:
            return
        counts = self.backbone.token_counts(missing)                 # rows of each text
        order = sorted(range(len(missing)), key=counts.__getitem__)
        max_rows = max(1, self.BLOCK_BYTES // self.row_bytes)
        blocks, block, rows = [], [], 0
        for k in order:
            if block and (len(block) == batch_texts or rows + counts[k] > max_rows):
                blocks.append(block)
                block, rows = [], 0
            block.append(missing[k])
            rows += counts[k]
        blocks.append(block)
        last_save = time.time()
        progress = tqdm(total=len(missing), desc=f"encoding {desc} ({self.backbone.name})", unit='text')
        texts = self.index['texts']
        with open(self.hidden_path, 'ab') as f, progress:
            try:
                for b, block in enumerate(blocks):
                    hidden, lengths = self.backbone.encode_rows(block, dtype=torch.float16)   # [rows, d_depth, d_emb]
                    finite = hidden.isfinite().flatten(1).all(dim=1)                           # [rows], one pass
                    if not finite.all():
                        first_text = bisect.bisect_right(np.cumsum(lengths), int((~finite).nonzero()[0, 0]))
                        raise UsageError(
                            f"backbone {self.backbone.name!r} gives hidden states that are not finite in float16 "
                            f"(NaN, or beyond +-65504) for the text {block[first_text][:60]!r}: they cannot be "
                            f"cached; run without --feature_cache")
                    hidden = hidden.cpu().numpy()
                    start = self.index['n_rows']
                    for text, length in zip(block, lengths):
                        rows = hidden[start - self.index['n_rows']:][:length]           # this text's rows
                        texts[text] = [start, length, rows_checksum(text, rows)]
                        start += length
                    f.write(hidden.data)                             # one write per block, the texts' rows in order
                    self.index['n_rows'] = start
                    progress.update(len(block))
                    if time.time() - last_save > self.SAVE_EVERY_SECONDS or b == len(blocks) - 1:
                        f.flush()
                        os.fsync(f.fileno())
                        self._save_index()
                        last_save = time.time()
            except BaseException:
                try:                   # the index on disk is the truth: rows past it (and their texts) are dropped
                    self._load()
                except Exception:
                    pass
                raise

    def dataset(self, texts, labels, desc=''):
        """-> a Dataset of (hidden float32 tensor [n_pos, d_depth, d_emb], label), encoding what is missing."""
        self.ensure(texts, desc)
        spans = [self.index['texts'][t] for t in texts]
        return CachedFeatures(self.hidden_path, self.index['n_rows'], (self.meta['d_depth'], self.meta['d_emb']),
                              spans, labels, texts=texts)


class _disk_errors:
    """Turns a full disk (ENOSPC, EDQUOT) or a read-only folder (EROFS, EACCES, EPERM) met while the store is
    written into one clear OSError naming the folder (what was stored before is kept: see FeatureStore)."""

    def __init__(self, folder):
        self.folder = folder

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            raise UsageError(f"feature cache {self.folder}: cannot write it ({DISK_ERRNOS[e.errno]}: {e.strerror}). "
                             f"What was stored before is kept; free some space, or pass another --feature_cache "
                             f"(or none)") from e
        return False


DISK_ERRNOS = {errno.ENOSPC: 'disk full', errno.EDQUOT: 'disk quota exceeded', errno.EROFS: 'read-only file system',
               errno.EACCES: 'permission denied', errno.EPERM: 'not permitted'}


class _Release:
    """Context manager that releases an already acquired lock."""

    def __init__(self, lock):
        self.lock = lock

    def __enter__(self):
        return self.lock

    def __exit__(self, *exc):
        self.lock.release()


class CachedFeatures(Dataset):
    """(hidden [n_pos, d_depth, d_emb] float32, label) read from a FeatureStore's memory map;
    .lengths holds each sample's n_pos. spans: [start, length, checksum] per sample, texts: the samples' texts;
    each sample's rows are checked against its checksum when first read (ValueError naming the text)."""

    def __init__(self, hidden_path, n_rows, row_shape, spans, labels, texts):
        self.hidden_path, self.n_rows, self.row_shape = hidden_path, n_rows, tuple(row_shape)
        self.spans, self.labels, self.texts = spans, [int(y) for y in labels], list(texts)
        self.lengths = [span[1] for span in spans]
        self._rows = None                                            # opened lazily (also in loader workers)
        self._verified = np.zeros(len(spans), dtype=bool)            # checksums already checked, in this process

    def __len__(self):
        return len(self.spans)

    def __getitem__(self, i):
        if self._rows is None:
            self._rows = np.memmap(self.hidden_path, dtype=np.float16, mode='r', shape=(self.n_rows, *self.row_shape))
        start, length, checksum = self.spans[i]
        rows = self._rows[start:start + length]                      # [length, d_depth, d_emb] float16
        if not self._verified[i]:
            if rows_checksum(self.texts[i], rows) != checksum:
                raise damaged(os.path.dirname(self.hidden_path),
                              f"the features of the text {self.texts[i][:60]!r} (rows {start} to {start + length - 1} "
                              f"of {self.hidden_path}) do not match their checksum (flipped bits, overwritten or "
                              f"swapped rows)")
            self._verified[i] = True
        return torch.from_numpy(rows.astype(np.float32)), self.labels[i]

    def __getstate__(self):
        return {**self.__dict__, '_rows': None}


# -----------------------------------------------------------------------------
# batching


def pad_positions(sequences):
    """[tensor [n_pos_b, d_depth, d_emb]] -> hidden [batch, n_pos, d_depth, d_emb] (zeros after each
    sequence's end), mask [batch, n_pos] (True = padding)."""
    n_pos = max(len(s) for s in sequences)
    hidden = sequences[0].new_zeros(len(sequences), n_pos, *sequences[0].shape[1:])
    mask = torch.ones(len(sequences), n_pos, dtype=torch.bool, device=hidden.device)
    for b, s in enumerate(sequences):
        hidden[b, :len(s)] = s
        mask[b, :len(s)] = False
    return hidden, mask


def collate_features(batch):
    """[(hidden [n_pos_b, d_depth, d_emb], label)] -> hidden [B, n_pos, d_depth, d_emb] zero-padded,
    mask [B, n_pos] (True = padding), labels [B]."""
    hidden, mask = pad_positions([h for h, _ in batch])
    return hidden, mask, torch.tensor([y for _, y in batch])


class LengthGroupedBatchSampler(torch.utils.data.Sampler):
    """
    Shuffled batches of similar-length samples, so little of each batch is padding (padding is
    masked, so this changes speed, not results). Each epoch: shuffle all indices, cut them into
    groups of `batch_size * group_batches`, sort each group by length, cut it into batches, and
    shuffle the batches. Draws from `generator` (default: torch's global RNG); seed it for
    reproducible passes. shuffle=False (evaluation): the same batches every time, sorted by length.
    """

    def __init__(self, lengths, batch_size, group_batches=64, shuffle=True, generator=None):
        self.lengths, self.batch_size, self.shuffle = list(lengths), batch_size, shuffle
        self.generator = generator
        self.group = batch_size * group_batches if shuffle else len(self.lengths)

    def __len__(self):
        return (len(self.lengths) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        if not self.shuffle:
            order = sorted(range(len(self.lengths)), key=self.lengths.__getitem__)
            return iter([order[k:k + self.batch_size] for k in range(0, len(order), self.batch_size)])
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        batches = []
        for s in range(0, len(order), self.group):
            group = sorted(order[s:s + self.group], key=self.lengths.__getitem__)
            batches += [group[k:k + self.batch_size] for k in range(0, len(group), self.batch_size)]
        return iter([batches[k] for k in torch.randperm(len(batches), generator=self.generator).tolist()])
