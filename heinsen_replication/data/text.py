"""
Text datasets: the Stanford Sentiment Treebank (SST-5, SST-2; PTB trees with all subtrees) and IMDB.

    load_sst(data_root, download, binary, source='files')   -> {'train', 'valid', 'test': TextDataset}
    load_imdb(data_root, download, source='files')          -> {'train', 'test': TextFilesDataset | TextDataset}

source='files' (the offline default) reads the official files under data_root; source='hub' loads the same data
with the `datasets` library from the Hugging Face hub (downloads.SST_HUB, downloads.IMDB_HUB). No library reads
PTB trees into every labelled subtree as SST training needs, so the PTB reader here is our own, for both sources.

Imports data.downloads and data.fileio only.
"""

import functools
import os
import re

from torch.utils.data import Dataset

from ..errors import UsageError
from . import downloads
from .fileio import check_labels


class TextDataset(Dataset):
    """In-memory (text, label) pairs. Exposes .texts (list[str]) and .labels (list[int])."""

    def __init__(self, texts, labels):
        assert len(texts) == len(labels)
        self.texts, self.labels = list(texts), [int(y) for y in labels]

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, i):
        return self.texts[i], self.labels[i]


class TextFilesDataset(Dataset):
    """
    (text, label) pairs read lazily, one text file per example (used for IMDB). Only the paths are
    listed up front; each file is read in __getitem__. Accessing .texts reads (and caches) all files.
    """

    def __init__(self, paths, labels, clean=None):
        assert len(paths) == len(labels)
        self.paths, self.labels = list(paths), [int(y) for y in labels]
        self.clean = clean  # optional str -> str applied to each file's text
        self._texts = None

    def read(self, i):
        with open(self.paths[i], encoding='utf-8') as f:
            text = f.read()
        return self.clean(text) if self.clean is not None else text

    @property
    def texts(self):
        if self._texts is None:
            self._texts = [self.read(i) for i in range(len(self))]
        return self._texts

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return (self._texts[i] if self._texts is not None else self.read(i)), self.labels[i]


def load_hub(hub, what):
    """datasets.load_dataset(*hub) -> a DatasetDict; errors say how to use the files instead.

    datasets 5.x runs no loading scripts: where the repository's main branch still holds one (stanfordnlp/sst was
    published with sst.py), the hub's own Parquet conversion of it is loaded instead, the branch
    refs/convert/parquet, whose folder <config>/<split>/*.parquet holds the config's splits."""
    try:
        import datasets
    except ImportError as e:
        raise UsageError(f"{what} from the Hugging Face hub (data_source 'hub') needs the datasets library: "
                          f"pip install datasets (or use the files: data_source 'files', the default)") from e
    attempt = f"datasets.load_dataset{hub!r}"
    try:
        try:
            return datasets.load_dataset(*hub)
        except Exception as e:
            if 'scripts are no longer supported' not in str(e):
                raise
        attempt = f"datasets.load_dataset({hub[0]!r}, data_dir={hub[1]!r}, revision={HUB_PARQUET_EXPORT!r})"
        return datasets.load_dataset(hub[0], data_dir=hub[1], revision=HUB_PARQUET_EXPORT)
    except Exception as e:  # offline (HF_HUB_OFFLINE), no access, a missing config, ...: say what to do instead
        raise UsageError(f"Could not load {what} from the Hugging Face hub, {attempt} "
                           f"({type(e).__name__}: {e}). Is the network available? The offline alternative is the "
                           f"official files (data_source 'files', the default, with --download).") from e


HUB_PARQUET_EXPORT = 'refs/convert/parquet'    # the hub's Parquet conversion of a repository (one folder per config)


def hub_split(dataset_dict, split, columns, where):
    """dataset_dict[split], checked to have `columns`."""
    if split not in dataset_dict:
        raise UsageError(f"{where}: no {split!r} split (found {sorted(dataset_dict)})")
    ds = dataset_dict[split]
    absent = [c for c in columns if c not in ds.column_names]
    if absent:
        raise UsageError(f"{where} {split}: no column {absent[0]!r} (found {ds.column_names})")
    return ds

# -----------------------------------------------------------------------------
# Stanford Sentiment Treebank (SST-5, SST-2): PTB trees, one per line, a 0..4 label on every node:
#   (3 (2 It) (4 (2 's) (2 .)))
# A tree here is a tuple (label: int, children), where children is a list of trees for an inner
# node and the word (str) for a leaf.

_PTB_TOKEN_RE = re.compile(r'\(|\)|[^ \t\r\n()]+')  # only ASCII whitespace separates: SST has U+00A0 inside words


def parse_ptb_tree(line: str):
    """Parse one PTB tree string into nested (label, children) tuples. Raises ValueError if malformed."""
    stack, root = [], None  # stack of open nodes: [label, children (list), words (list)]
    for tok in _PTB_TOKEN_RE.findall(line):
        if root is not None:
            raise ValueError(f"unexpected text after the end of the tree: {line[:80]!r}")
        if tok == '(':
            stack.append([None, [], []])
        elif tok == ')':
            if not stack:
                raise ValueError(f"unbalanced ')' in tree: {line[:80]!r}")
            label, children, words = stack.pop()
            if label is None or (children and words) or not (children or words):
                raise ValueError(f"malformed node in tree: {line[:80]!r}")
            node = (label, children if children else ' '.join(words))
            if stack:
                stack[-1][1].append(node)
            else:
                root = node
        else:  # an atom: the node's label if it has none yet, else a word
            if not stack:
                raise ValueError(f"text outside parentheses in tree: {line[:80]!r}")
            if stack[-1][0] is None:
                try:
                    stack[-1][0] = int(tok)
                except ValueError:
                    raise ValueError(f"non-integer label {tok!r} in tree: {line[:80]!r}") from None
            else:
                stack[-1][2].append(tok)
    if stack or root is None:
        raise ValueError(f"incomplete tree: {line[:80]!r}")
    return root


def iter_subtrees(tree):
    """Yield every subtree (root first, then pre-order, left to right), leaves included."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node[1], list):
            stack.extend(reversed(node[1]))


def tree_leaves(tree):
    """The words of a tree, left to right."""
    return [node[1] for node in iter_subtrees(tree) if isinstance(node[1], str)]


def parse_ptb_lines(lines, where: str, n_labels: int = 5):
    """Parse PTB trees, one per line (blank lines ignored), every node's label in 0..n_labels-1 (SST: 0..4).
    ValueErrors name `where` (a file, or a hub split) and the line: malformed trees, labels out of range,
    binary data (NUL bytes)."""
    trees = []
    for line_no, line in enumerate(lines, 1):
        if '\x00' in line:
            raise UsageError(f"{where}, line {line_no}: binary data (NUL bytes), not a text file of PTB trees")
        if not line.strip():
            continue
        try:
            tree = parse_ptb_tree(line)
        except ValueError as e:
            raise UsageError(f"{where}, line {line_no}: {e}") from None
        bad = [node[0] for node in iter_subtrees(tree) if not 0 <= node[0] < n_labels]
        if bad:
            raise UsageError(f"{where}, line {line_no}: label {bad[0]} is out of range "
                             f"(sentiment labels are 0..{n_labels - 1}): {line.strip()[:80]!r}")
        trees.append(tree)
    return trees


def read_ptb_trees(path: str, n_labels: int = 5):
    """Parse a file of PTB trees, one per line (blank lines ignored; UTF-8, with or without a byte order mark;
    trees of any depth). Every node's label must be in 0..n_labels-1 (SST: 0..4). Errors name the file and line: ValueError for text that is not UTF-8
    (e.g. latin-1) or is binary, malformed trees and labels out of range."""
    try:
        with open(path, encoding='utf-8-sig') as f:        # a UTF-8 byte order mark, if any, is not text
            return parse_ptb_lines(f, path, n_labels)
    except UnicodeDecodeError:
        line_no, bad = '?', b''
        with open(path, 'rb') as f:
            for line_no, raw in enumerate(f, 1):
                try:
                    raw.decode('utf-8')
                except UnicodeDecodeError as e:
                    bad = raw[e.start:e.start + 1]
                    break
        raise UsageError(f"{path}, line {line_no}: not UTF-8 text (byte {bad!r}; a latin-1 copy, or a binary "
                         f"file?): the SST tree files are UTF-8") from None


_PTB_SYMBOLS = {'-LRB-': '(', '-RRB-': ')', '-LSB-': '[', '-RSB-': ']', '-LCB-': '{', '-RCB-': '}',
                '``': '"', "''": '"', '`': "'"}
_OPENING = {'(', '[', '{'}                                # no space after these
_OPENING_QUOTES, _CLOSING_QUOTES = {'``', '`'}, {"''", "'"}  # PTB quote tokens: ` `` open, ' '' close
_ATTACH_LEFT = {"n't", "'s", "'re", "'ve", "'m", "'ll", "'d",  # no space before these (compared lower-case)
                '.', ',', ';', ':', '!', '?', '%', ')', ']', '}'}


def detokenize(tokens: list[str]) -> str:
    """
    Turn PTB tokens back into natural text:
      -LRB- -RRB- (and -LSB- ... -RCB-) -> ( ) [ ] { };  `` and '' -> ";  ` -> ';  \\/ -> /;  \\* -> *
      no space before n't 's 're 've 'm 'll 'd . , ; : ! ? % and closing brackets;
      no space after opening brackets; quotes hug their contents (`` a b '' -> "a b", ` a ' -> 'a',
      and so does a lone possessive ' as in "the Girls ' film" -> "the Girls' film");
      whitespace collapsed to single spaces (SST words may contain U+00A0, e.g. '2\\xa01\\/2' -> '2 1/2').
    E.g. ['It', "'s", 'a', '-LRB-', 'great', '-RRB-', 'film', ',', 'is', "n't", 'it', '?'] -> "It's a (great) film, isn't it?"
    """
    text, glue_next = '', True  # glue_next: the next token attaches to the previous one (no space)
    for raw in tokens:
        tok = _PTB_SYMBOLS.get(raw, raw).replace('\\/', '/').replace('\\*', '*')
        if not tok.strip():
            continue
        if not glue_next and not (tok.lower() in _ATTACH_LEFT or raw in _CLOSING_QUOTES):
            text += ' '
        text += tok
        glue_next = tok in _OPENING or raw in _OPENING_QUOTES
    return ' '.join(text.split())


def _phrases(tree):
    """-> [(label, words)] for every subtree of tree, root first, then pre-order (left to right). Iterative: trees
    nested deeper than Python's recursion limit are read like any other."""
    words, spans = [], []  # spans[k] = [label, start, end] of the k-th subtree in pre-order
    stack = [(tree, None)]  # (node to visit, None) or (None, span of a node whose subtrees are all visited)
    while stack:
        node, done = stack.pop()
        if done is not None:
            done[2] = len(words)
            continue
        span = [node[0], len(words), None]
        spans.append(span)
        if isinstance(node[1], str):
            words.append(node[1])
            span[2] = len(words)
        else:
            stack.append((None, span))
            stack.extend((child, None) for child in reversed(node[1]))
    return [(label, words[start:end]) for label, start, end in spans]


def sst_examples(trees, all_phrases: bool):
    """
    (texts, labels) with 5-class labels 0..4 from a list of SST trees.
    all_phrases=False: one example per tree, the root sentence (no deduplication: dev/test as published).
    all_phrases=True: every subtree (sentences, phrases, single words), DEDUPLICATED BY TEXT, keeping
    the FIRST occurrence's label. Deterministic order: all roots first in file order, then the
    remaining phrases tree by tree in file order, each tree in pre-order (left to right).
    """
    if not all_phrases:
        return [detokenize(tree_leaves(tree)) for tree in trees], [tree[0] for tree in trees]
    phrases = [_phrases(tree) for tree in trees]
    examples = {}  # text -> label; dicts keep insertion order
    for tree_phrases in phrases:  # the roots first ...
        label, words = tree_phrases[0]
        examples.setdefault(detokenize(words), label)
    for tree_phrases in phrases:  # ... then all other phrases
        for label, words in tree_phrases[1:]:
            examples.setdefault(detokenize(words), label)
    examples.pop('', None)
    return list(examples), list(examples.values())


def sst_to_binary(texts, labels):
    """SST-2 from SST-5 labels: drop neutral (2); 0, 1 -> 0 (negative); 3, 4 -> 1 (positive)."""
    kept = [(t, int(y > 2)) for t, y in zip(texts, labels) if y != 2]
    return [t for t, _ in kept], [y for _, y in kept]


def _sst_dir(data_root, download):
    """Folder holding train.txt, dev.txt, test.txt (the official zip unpacks them into sst/trees/)."""
    root = os.path.join(data_root, 'sst')
    names = ('train.txt', 'dev.txt', 'test.txt')
    candidates = (root, os.path.join(root, 'trees'))
    for d in candidates:
        if all(os.path.isfile(os.path.join(d, f)) for f in names):
            return d
    if download:
        downloads.download_and_extract(downloads.SST_URL, root, members=downloads.SST_MEMBER_CHECKSUMS,
                                       by_hand=f"put its three PTB tree files trees/train.txt, trees/dev.txt and "
                                               f"trees/test.txt into {os.path.abspath(root)}/ (or point at the "
                                               f"folder that holds sst/: --data_root for train.py and python -m "
                                               f"data, DATA_ROOT=... for train_all_heads.sh).")
        return _sst_dir(data_root, download=False)
    # name the file that is missing, in the folder that holds the others
    d = max(candidates, key=lambda c: sum(os.path.isfile(os.path.join(c, f)) for f in names))
    missing = [f for f in names if not os.path.isfile(os.path.join(d, f))]
    raise downloads.missing('Stanford Sentiment Treebank', os.path.join(d, missing[0]),
                            f"Expected train.txt, dev.txt, test.txt (PTB trees) in {os.path.abspath(d)}; missing: "
                            f"{', '.join(missing)}. " + downloads.how_to_get(downloads.SST_URL, root))


def _sst_file_examples(path, all_phrases):
    """sst_examples() of a tree file, cached per (file, size, mtime): sst5 and sst2 parse it only once."""
    st = os.stat(path)
    return _sst_file_examples_cached(os.path.abspath(path), st.st_size, st.st_mtime_ns, all_phrases)


@functools.lru_cache(maxsize=6)
def _sst_file_examples_cached(path, size, mtime_ns, all_phrases):
    texts, labels = sst_examples(read_ptb_trees(path), all_phrases)
    return tuple(texts), tuple(labels)  # immutable: cached results are shared between calls


def load_sst(data_root, download, binary, source='files'):
    """
    SST-5 (binary=False) or SST-2 (binary=True).
    train: all deduplicated phrases of the training trees (see sst_examples);
    valid: dev root sentences; test: test root sentences. SST-2 drops neutral examples.
    source='files': data_root/sst/{train,dev,test}.txt (or sst/trees/, as the official zip unpacks);
    source='hub': the same trees from the hub's stanfordnlp/sst 'ptb' config (data_root, download unused).
    """
    splits = {'train': 'train', 'valid': 'dev', 'test': 'test'}   # our split -> the official file's name
    if source == 'files':
        d = _sst_dir(data_root, download)
        where = {split: os.path.join(d, f'{name}.txt') for split, name in splits.items()}
        examples = {split: _sst_file_examples(where[split], all_phrases=(split == 'train')) for split in splits}
    elif source == 'hub':
        hub = load_hub(downloads.SST_HUB, 'SST')
        hub_names = {'train': 'train', 'valid': 'validation', 'test': 'test'}
        where = {split: f"{downloads.SST_HUB[0]} ({downloads.SST_HUB[1]}) {hub_names[split]}" for split in splits}
        examples = {}
        for split in splits:
            ds = hub_split(hub, hub_names[split], ['ptb_tree'], f"{downloads.SST_HUB[0]} ({downloads.SST_HUB[1]})")
            examples[split] = sst_examples(parse_ptb_lines(ds['ptb_tree'], where[split]), all_phrases=(split == 'train'))
    else:
        raise UsageError(f"unknown data source {source!r}: 'files' or 'hub'")
    if binary:  # note: dedup happened on the 5-class labels, so SST-2 train is a subset of SST-5 train
        examples = {k: sst_to_binary(*v) for k, v in examples.items()}
    for split, (texts, _) in examples.items():
        if not texts:  # an accuracy over nothing is no result
            why = 'all its examples are neutral (label 2), which SST-2 drops' if binary else 'it holds no trees'
            raise UsageError(f"{where[split]}: the {'sst2' if binary else 'sst5'} {split} split is empty ({why})")
    return {k: TextDataset(*v) for k, v in examples.items()}

# -----------------------------------------------------------------------------
# IMDB (Maas et al., 2011): aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt


def clean_imdb(text):
    """Replace the '<br />' tags in IMDB reviews with spaces and collapse whitespace."""
    return ' '.join(re.sub(r'<br\s*/?>', ' ', text, flags=re.IGNORECASE).split())


def load_imdb(data_root, download, source='files'):
    """
    IMDB, label 0 = negative, 1 = positive; reviews cleaned by clean_imdb. No validation split.
    source='files': data_root/aclImdb/{train,test}/{neg,pos}/*.txt, read lazily (TextFilesDataset), neg then
    pos, each sorted by file name. source='hub': the hub's stanfordnlp/imdb (the same reviews and labels, in the
    hub's order; its 'unsupervised' split is not used), in memory (TextDataset); data_root, download unused.
    """
    if source == 'hub':
        hub, what = load_hub(downloads.IMDB_HUB, 'IMDB'), f"{downloads.IMDB_HUB[0]} ({downloads.IMDB_HUB[1]})"
        splits = {}
        for split in ('train', 'test'):
            ds = hub_split(hub, split, ['text', 'label'], what)
            labels = check_labels(ds['label'], 2, f"{what} {split}")
            splits[split] = TextDataset([clean_imdb(t) for t in ds['text']], labels)
        return splits
    if source != 'files':
        raise UsageError(f"unknown data source {source!r}: 'files' or 'hub'")
    root = os.path.join(data_root, 'aclImdb')
    needed = [os.path.join(root, s, c) for s in ('train', 'test') for c in ('neg', 'pos')]
    if download and not all(os.path.isdir(p) for p in needed):
        # the archive holds aclImdb/
        downloads.download_and_extract(downloads.IMDB_URL, data_root, checksum=downloads.CHECKSUMS[downloads.IMDB_URL])
    for p in needed:
        if not os.path.isdir(p):
            raise downloads.missing('IMDB', p, downloads.how_to_get(downloads.IMDB_URL, data_root)
                                    + ' (the archive holds aclImdb/)')
    splits = {}
    for split in ('train', 'test'):
        paths, labels = [], []
        for label, cls in ((0, 'neg'), (1, 'pos')):  # label 0 = negative, 1 = positive
            folder = os.path.join(root, split, cls)
            names = sorted(n for n in os.listdir(folder) if n.endswith('.txt'))
            paths += [os.path.join(folder, n) for n in names]
            labels += [label] * len(names)
        splits[split] = TextFilesDataset(paths, labels, clean=clean_imdb)
    return splits
