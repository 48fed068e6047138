"""Image understanding distils a frozen SigLIP2 teacher from a local directory (paper §3.3), tested on a
small SigLIP2-shaped checkpoint built here: real transformers classes, real tokenizer files, no download."""
from __future__ import annotations

import pytest
import torch

from atoken.config import preset
from atoken.model import AToken

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def siglip2_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Siglip2Config, Siglip2Model

    d = tmp_path_factory.mktemp("siglip2")
    words = "<pad> <unk> </s> a photo of cat dog handwritten digit zero one two rocket".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>").save_pretrained(d)
    torch.manual_seed(0)
    cfg = Siglip2Config(text_config={"vocab_size": len(words), "hidden_size": 32, "intermediate_size": 64,
                                     "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 64,
                                     "projection_size": 32},
                        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "num_patches": 64, "patch_size": 16})
    Siglip2Model(cfg).eval().save_pretrained(d)
    return d


def test_teacher_loads_offline_and_scores_in_one_space(siglip2_dir):
    from atoken.siglip2 import SigLIP2Teacher

    t = SigLIP2Teacher(siglip2_dir)
    imgs = [torch.rand(32, 48, 3) * 2 - 1, torch.rand(16, 16, 3) * 2 - 1]
    s = t.similarities(imgs, ["a photo of a cat", "a handwritten digit zero", "a rocket"])
    assert s.shape == (2, 3) and torch.isfinite(s).all()
    assert not torch.allclose(s[0], s[1])  # images of other content score the texts differently
    with pytest.raises(FileNotFoundError, match="losses.teacher_path"):
        SigLIP2Teacher(siglip2_dir / "nowhere")


def test_student_learns_toward_the_teacher_through_the_training_module(siglip2_dir):
    from atoken.losses import distillation_kl
    from atoken.siglip2 import SigLIP2Teacher
    from trainers.config import TrainConfig
    from trainers.data import Sample
    from trainers.module import TrainModule

    cfg = TrainConfig()
    cfg.losses.teacher, cfg.losses.teacher_path = "siglip2", str(siglip2_dir)
    teacher = SigLIP2Teacher(siglip2_dir)
    torch.manual_seed(0)
    module = TrainModule(AToken(preset("tiny")), 384, None, cfg, teacher=teacher)
    captions = ["a photo of a cat", "a photo of a dog", "a handwritten digit one", "a rocket"]
    samples = [Sample("image", torch.rand(32, 32, 3) * 2 - 1, 4, c, None, str(i)) for i, c in enumerate(captions)]
    text = torch.nn.functional.normalize(torch.randn(4, 384), dim=-1)
    opt = torch.optim.Adam(module.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        terms = module("image_und", samples, text, 0)
        assert set(terms) == {"distill", "total"}  # images distil; no sigmoid term when a teacher is set
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
        first = first if first is not None else float(terms["distill"])
    assert float(terms["distill"]) < 0.5 * first  # the student's similarity distribution moves to the teacher's
    s = torch.randn(4, 6)
    assert distillation_kl(s, s) < 1e-6
    cfg.losses.teacher_path, cfg.data.shards = "", "x"
    with pytest.raises(ValueError, match="losses.teacher_path"):
        cfg.validate()
