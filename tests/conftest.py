"""Shared fixtures: tiny randomly initialised backbones of the paper's architecture classes
(BERT as in all-MiniLM-L6-v2, RoBERTa as in roberta-large, BEiT as in beit-large), saved as local
folders so they load through the same code path as hub models; and tiny SST tree files."""
import os
from pathlib import Path

import pytest
import torch

from tests.helpers.files import NEGATIVE, POSITIVE, tree

torch.set_num_threads(1)  # tiny tensors: one thread is fastest, and immune to a busy second core
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
# the subprocesses and notebook kernels the tests start import this checkout's packages, as the tests do (pytest's
# pythonpath), even where another copy is installed
os.environ['PYTHONPATH'] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                         os.environ.get('PYTHONPATH')]))



def _tiny_text_backbone(folder, config_cls, model_cls, **extra):
    import transformers
    from heinsen_replication.backbones import minilm_path
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path())
    config = config_cls(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, pad_token_id=tokenizer.pad_token_id, **extra)
    model_cls(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope='session')
def tiny_bert(tmp_path_factory):
    import transformers
    return _tiny_text_backbone(tmp_path_factory.mktemp('tiny-bert'), transformers.BertConfig, transformers.BertModel,
                               max_position_embeddings=64)


@pytest.fixture(scope='session')
def tiny_roberta(tmp_path_factory):
    import transformers
    return _tiny_text_backbone(tmp_path_factory.mktemp('tiny-roberta'), transformers.RobertaConfig,
                               transformers.RobertaModel, max_position_embeddings=66)


@pytest.fixture(scope='session')
def tiny_gpt2(tmp_path_factory):
    """A tiny random GPT-2 (the 2019 paper's backbone class) with a real byte-level BPE GPT-2 tokenizer trained on
    a few words: like gpt2-large's, it has no pad token."""
    import transformers
    from tokenizers import ByteLevelBPETokenizer
    folder = tmp_path_factory.mktemp('tiny-gpt2')
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([f'the film is {w}' for w in POSITIVE + NEGATIVE] * 3, vocab_size=300, min_frequency=1,
                            special_tokens=['<|endoftext|>'])
    tokenizer = transformers.GPT2TokenizerFast(tokenizer_object=bpe, bos_token='<|endoftext|>',
                                               eos_token='<|endoftext|>', unk_token='<|endoftext|>')
    assert tokenizer.pad_token is None
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    transformers.GPT2Model(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope='session')
def tiny_beit(tmp_path_factory):
    import transformers
    folder = tmp_path_factory.mktemp('tiny-beit')
    config = transformers.BeitConfig(image_size=32, patch_size=16, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=37)
    transformers.BeitModel(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture
def tiny_sst(tmp_path):
    """data_root with sst/{train,dev,test}.txt: 'a good film' is positive (4), 'a bad film' negative (0)."""
    import random
    rng = random.Random(0)
    folder = tmp_path / 'sst'
    folder.mkdir()
    for split, n in (('train', 40), ('dev', 12), ('test', 12)):
        lines = []
        for k in range(n):
            label = 4 if k % 2 == 0 else 0
            word = rng.choice(POSITIVE if label == 4 else NEGATIVE)
            lines.append(tree(label, ['the', 'film', 'is', word, f'{split}{k}']))
        (folder / f'{split}.txt').write_text('\n'.join(lines) + '\n')
    return str(tmp_path)
