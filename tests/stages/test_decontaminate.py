"""Decontamination: planted benchmark items are found (verbatim, lightly edited, embedded), clean rows kept."""

import json
import random
import re
from collections import Counter
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distillery.stages.decontaminate import (
    SPAN_CHARS,
    Benchmark,
    BenchmarkIndex,
    decontaminate,
    load_benchmark,
    lsh_params,
    normalize,
    shingle_set,
    word_edits,
)
from distillery.uri_io import StorageError
from schemas.recipe import BenchmarkSource, DecontaminationConfig

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
SOURCES = [
    BenchmarkSource(name="gsm8k", path=str(DATA / "gsm8k" / "test.jsonl")),
    BenchmarkSource(name="aime24", path=str(DATA / "benchmarks" / "aime24" / "test.jsonl"), fields=["problem"]),
    BenchmarkSource(name="amc23", path=str(DATA / "benchmarks" / "amc23" / "test.jsonl")),
    BenchmarkSource(name="svamp", path=str(DATA / "benchmarks" / "svamp" / "test.jsonl"), fields=["Body", "Question"]),
]
CFG = DecontaminationConfig(benchmarks=SOURCES)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _train(start: int, stop: int) -> pl.DataFrame:
    rows = _read_jsonl(DATA / "gsm8k" / "train.jsonl")[start:stop]
    return pl.DataFrame({"question": [r["question"] for r in rows], "completion": [r["answer"] for r in rows]})


@pytest.fixture(scope="module")
def benchmarks() -> list[Benchmark]:
    return [load_benchmark(src) for src in SOURCES]


@pytest.fixture(scope="module")
def index(benchmarks) -> BenchmarkIndex:
    return BenchmarkIndex.build(benchmarks, CFG)


def _item(benchmarks, name: str, item_id: str) -> str:
    bench = next(b for b in benchmarks if b.name == name)
    return bench.texts[bench.ids.index(item_id)]


def _insert_middle(text: str, word: str) -> str:
    words = text.split(" ")
    return " ".join([*words[: len(words) // 2], word, *words[len(words) // 2 :]])


def _planted(benchmarks) -> list[tuple[str, str, str, str, str, str]]:
    """(question, completion, benchmark, item id, method, column) for each planted row."""
    item = lambda name, item_id: _item(benchmarks, name, item_id)  # noqa: E731
    clean_answer = "We add the numbers step by step and check the total twice. The answer is 42"
    no_punct = lambda t: re.sub(r"[.,?!;:$]", "", t)  # noqa: E731
    return [
        # verbatim
        (item("gsm8k", "0"), clean_answer, "gsm8k", "0", "ngram", "question"),
        (item("aime24", "61"), clean_answer, "aime24", "61", "ngram", "question"),
        (item("svamp", "19"), clean_answer, "svamp", "19", "ngram", "question"),
        # case changed, thousands separators dropped ($80,000 -> 80000)
        (re.sub(r"(\d),(\d)", r"\1\2", item("gsm8k", "2")).upper(), clean_answer, "gsm8k", "2", "ngram", "question"),
        # extra white space and a preamble
        ("Please answer:   " + re.sub(" ", "  \n ", item("gsm8k", "88")), clean_answer, "gsm8k", "88", "ngram", "question"),
        # punctuation (and $) removed
        (no_punct(item("aime24", "60")), clean_answer, "aime24", "60", "ngram", "question"),
        (no_punct(item("amc23", "0")).lower(), clean_answer, "amc23", "0", "ngram", "question"),
        # numbers written with a trailing .0 (78 -> 78.0)
        (re.sub(r"\b(\d+)\b", r"\1.0", item("svamp", "42")), clean_answer, "svamp", "42", "ngram", "question"),
        # a word inserted in the middle of a long item: other 13-grams survive
        (_insert_middle(item("aime24", "63"), "carefully"), clean_answer, "aime24", "63", "ngram", "question"),
        # a short item with a preamble and a word inserted: no 13-gram survives, the near-duplicate rule finds it
        (
            "Please answer: " + item("svamp", "4").replace("15 dollars at", "15 dollars today at"),
            clean_answer,
            "svamp",
            "4",
            "near_duplicate",
            "question",
        ),
        # embedded in a longer completion
        (
            "Solve the following problem about a school trip.",
            "Let me recall a similar problem. "
            + item("gsm8k", "10")
            + " Working it through, 60 plus 180 is 240 ... The answer is 366",
            "gsm8k",
            "10",
            "ngram",
            "completion",
        ),
        # a benchmark item shorter than 13 words, contained whole in a completion
        (
            "Count the squares.",
            "First I ask: " + item("amc23", "18").lower() + " Then I list 25, 100, 225 and so on. The answer is 8",
            "amc23",
            "18",
            "ngram",
            "completion",
        ),
    ]


def test_planted_items_are_found_and_clean_rows_kept(benchmarks, index):
    clean = _train(1000, 1200)
    planted = _planted(benchmarks)
    dirty = pl.DataFrame({"question": [p[0] for p in planted], "completion": [p[1] for p in planted]})
    # interleave the planted rows among the clean ones, remembering where they went
    rows = pl.concat([clean, dirty]).with_row_index("sample_id").with_columns(pl.col("sample_id").cast(pl.Utf8))
    rows = rows.sample(fraction=1.0, shuffle=True, seed=7)
    planted_ids = {str(clean.height + i): p for i, p in enumerate(planted)}

    result = decontaminate(rows, benchmarks, CFG, index=index)

    assert sorted(result.rejects["sample_id"].to_list()) == sorted(planted_ids)
    for sample_id, detail in zip(result.rejects["sample_id"], result.rejects["detail"], strict=True):
        _, _, bench, item_id, method, column = planted_ids[sample_id]
        found = json.loads(detail)
        assert (found["benchmark"], found["item"], found["method"], found["column"]) == (bench, item_id, method, column), (
            sample_id
        )
        assert found["span"] and len(found["span"]) <= SPAN_CHARS
    assert set(result.rejects["reason"]) == {"contaminated"}
    assert set(result.rejects["stage"]) == {"decontaminate"}
    # the kept rows are exactly the clean ones, in their order
    assert result.kept["sample_id"].to_list() == [s for s in rows["sample_id"] if s not in planted_ids]
    assert result.kept.columns == rows.columns

    # counts add up, and hits are counted per benchmark
    assert result.count.as_dict() == {
        "stage": "decontaminate",
        "rows_in": rows.height,
        "rows_out": clean.height,
        "fanout": 1,
        "dropped": {"contaminated": len(planted)},
    }
    assert result.meta["contamination_hits"] == dict(Counter(p[2] for p in planted))
    assert result.meta["contamination_hits"] == {"gsm8k": 4, "aime24": 3, "amc23": 2, "svamp": 3}


def test_spans_name_what_matched(benchmarks, index):
    short = _item(benchmarks, "amc23", "18")
    rows = pl.DataFrame(
        {
            "question": [
                _item(benchmarks, "gsm8k", "0"),
                "Please answer: " + _item(benchmarks, "svamp", "4").replace("15 dollars at", "15 dollars today at"),
            ],
            "completion": ["The answer is 18", "She has 63 dollars left."],
        }
    )
    details = [json.loads(d) for d in decontaminate(rows, benchmarks, CFG, index=index).rejects["detail"]]
    # the first 13 normalized words of the GSM8K item (a plain apostrophe-free n-gram)
    assert details[0]["span"] == "janets ducks lay 16 eggs per day she eats three for breakfast every"
    assert details[1]["span"] == normalize(_item(benchmarks, "svamp", "4"))
    assert details[1]["jaccard"] >= CFG.near_threshold
    one = pl.DataFrame(
        {"question": ["Warm up: " + short + " List them all."], "completion": [None]},
        schema={"question": pl.Utf8, "completion": pl.Utf8},
    )
    (detail,) = decontaminate(one, benchmarks, CFG, index=index).rejects["detail"]
    assert json.loads(detail)["span"] == "how many positive perfect squares less than 2023 are divisible by 5"


def test_gsm8k_train_is_clean_but_for_one_true_overlap(benchmarks):
    """The first 300 GSM8K train rows against GSM8K test + AIME24 + AMC23 + SVAMP.

    Train row 20 (Bella's stamps) really shares 13-grams with test item 632 (Max's stamps): the
    same problem with other names and numbers. No other row is flagged.
    """
    rows = _train(0, 300)
    result = decontaminate(rows, benchmarks, CFG)  # builds its own index
    assert result.count.dropped == {"contaminated": 1}
    (record,) = result.rejects["record"]
    assert json.loads(record)["question"] == rows["question"][20]
    detail = json.loads(result.rejects["detail"][0])
    assert (detail["benchmark"], detail["item"], detail["method"], detail["column"]) == ("gsm8k", "632", "ngram", "question")
    assert detail["span"] == "bought stamps at the post office some of the stamps had a snowflake"
    assert result.meta["contamination_hits"] == {"gsm8k": 1, "aime24": 0, "amc23": 0, "svamp": 0}
    assert result.kept.height == 299


def test_clean_rows_count_nothing(benchmarks, index):
    rows = _train(1000, 1100)
    result = decontaminate(rows, benchmarks, CFG, index=index)
    assert result.count.as_dict()["dropped"] == {} and result.count.rows_out == result.count.rows_in == 100
    assert result.rejects.height == 0 and result.kept.equals(rows)
    assert result.meta["contamination_hits"] == {"gsm8k": 0, "aime24": 0, "amc23": 0, "svamp": 0}


def test_every_benchmark_item_finds_itself(benchmarks, index):
    for bench in benchmarks:
        result = decontaminate(pl.DataFrame({"question": bench.texts}), benchmarks, CFG, index=index)
        items = [json.loads(d)["item"] for d in result.rejects["detail"]]
        assert items == bench.ids, bench.name
        assert result.meta["contamination_hits"][bench.name] == len(bench.ids)


def test_short_items_match_whole_words_only():
    bench = Benchmark("tiny", ["a"], ["Find the sum of 12 and 30."])
    padding = " ".join(f"filler{i}" for i in range(60))
    rows = pl.DataFrame(
        {
            "question": [
                f"{padding} so we must find the sum of 12 and 30 today",  # the whole item: found
                f"{padding} find the sum of 12 and 300",  # 300 is not 30
                f"{padding} refind the sum of 12 and 30",  # refind is not find
                f"{padding} find the sum of 12",  # only part of it
            ]
        }
    )
    result = decontaminate(rows, [bench], DecontaminationConfig(columns=["question"]))
    assert [json.loads(r)["question"] for r in result.rejects["record"]] == [rows["question"][0]]
    assert json.loads(result.rejects["detail"][0])["span"] == "find the sum of 12 and 30"


def test_near_duplicates_flagged_exactly_at_the_threshold():
    """Edits of one item at many Jaccard levels: flagged iff the exact 3-gram Jaccard >= the threshold.

    The 13-gram rule is out of the way (ngram larger than the item), so this checks the MinHash LSH
    does not miss a pair above the threshold and the exact Jaccard rejects those below it.
    """
    rng = random.Random(3)
    words = [f"w{i}" for i in range(40)]
    bench = Benchmark("synthetic", ["x"], [" ".join(words)])
    variants = []
    for n_edits in range(1, 12):
        for _ in range(4):
            edited = list(words)
            for _ in range(n_edits):
                edited[rng.randrange(len(edited))] = f"new{rng.randrange(10**6)}"
            variants.append(" ".join(edited))
    cfg = DecontaminationConfig(ngram=100, near_threshold=0.6, columns=["question"])
    result = decontaminate(pl.DataFrame({"question": variants}), [bench], cfg)
    item = shingle_set(words)
    jaccard = [len(item & (s := shingle_set(v.split()))) / len(item | s) for v in variants]
    expected = [v for v, j in zip(variants, jaccard, strict=True) if j >= 0.6]
    assert 0 < len(expected) < len(variants)  # both sides of the threshold are exercised
    assert [json.loads(r)["question"] for r in result.rejects["record"]] == expected
    assert {json.loads(d)["method"] for d in result.rejects["detail"]} == {"near_duplicate"}


def test_missing_columns_are_skipped_and_nulls_are_clean(benchmarks, index):
    cfg = DecontaminationConfig(columns=["question", "completion", "messages"])
    rows = pl.DataFrame({"question": [None, _item(benchmarks, "gsm8k", "5"), ""]}, schema={"question": pl.Utf8})
    result = decontaminate(rows, benchmarks, cfg, index=index)
    assert result.count.dropped == {"contaminated": 1} and result.kept.height == 2
    assert result.meta["columns_checked"] == ["question"]
    empty = decontaminate(rows.clear(), benchmarks, cfg, index=index)
    assert empty.count.as_dict()["rows_in"] == 0 and empty.kept.columns == ["question"]


def test_a_non_text_column_is_an_error(benchmarks, index):
    with pytest.raises(TypeError, match="'question'"):
        decontaminate(pl.DataFrame({"question": [1, 2]}), benchmarks, CFG, index=index)


def test_normalize_survives_light_edits():
    assert normalize("Janet’s ducks lay 1,000,000 eggs for $2.00!") == "janets ducks lay 1000000 eggs for 2"
    assert normalize("JANET'S   ducks\nlay 1000000 eggs for 2") == "janets ducks lay 1000000 eggs for 2"
    assert normalize("It is 27.0, not 2.05 or 1,23") == "it is 27 not 2 05 or 1 23"
    assert normalize("ＦＵＬＬ width_x  ") == "full width x"
    assert normalize("") == ""


def test_lsh_bands_find_pairs_at_the_threshold():
    for threshold in (0.5, 0.6, 0.8, 0.95):
        b, r = lsh_params(threshold)
        assert b * r <= 128 and 1 - (1 - threshold**r) ** b >= 0.995


def test_load_benchmark_joins_svamp_body_and_question():
    raw = _read_jsonl(DATA / "benchmarks" / "svamp" / "test.jsonl")
    bench = load_benchmark(SOURCES[3])
    assert bench.name == "svamp" and len(bench.texts) == len(raw) == 1000
    assert bench.texts[:3] == [f"{r['Body'].strip()} {r['Question'].strip()}" for r in raw[:3]]
    assert bench.ids[:3] == ["0", "1", "2"]  # SVAMP has no `id` field: row numbers


def test_load_benchmark_uses_an_id_field():
    bench = load_benchmark(SOURCES[1])
    raw = _read_jsonl(DATA / "benchmarks" / "aime24" / "test.jsonl")
    assert bench.ids == [str(r["id"]) for r in raw] and bench.ids[0] == "60"
    assert bench.texts[0] == raw[0]["problem"]


def test_load_benchmark_skips_rows_missing_a_field_and_reads_parquet(tmp_path):
    rows = [
        {"Body": "Tom has 3 apples.", "Question": "How many apples?"},
        {"Body": "No question here."},
        {"Body": "Ann has 5 pears.", "Question": "How many pears?"},
    ]
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    bench = load_benchmark(BenchmarkSource(name="b", path=str(jsonl), fields=["Body", "Question"]))
    assert bench.ids == ["0", "2"]
    assert bench.texts == ["Tom has 3 apples. How many apples?", "Ann has 5 pears. How many pears?"]
    parquet = tmp_path / "b.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": 7, "question": "What is 2+2?"}, {"id": 8, "question": None}]), parquet)
    assert load_benchmark(BenchmarkSource(name="p", path=str(parquet))) == Benchmark("p", ["7"], ["What is 2+2?"])


def test_load_benchmark_errors_are_clear(tmp_path):
    with pytest.raises(StorageError, match=r"benchmark 'gone'.*nope\.jsonl: no such file"):
        load_benchmark(BenchmarkSource(name="gone", path=str(tmp_path / "nope.jsonl")))
    wrong = tmp_path / "w.jsonl"
    wrong.write_text(json.dumps({"problem": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"no row of .* has the fields \['question'\]"):
        load_benchmark(BenchmarkSource(name="w", path=str(wrong)))


def test_load_benchmark_from_s3(s3):
    s3.create_bucket(Bucket="evals")
    s3.put_object(Bucket="evals", Key="amc23/test.jsonl", Body=(DATA / "benchmarks" / "amc23" / "test.jsonl").read_bytes())
    bench = load_benchmark(BenchmarkSource(name="amc23", path="s3://evals/amc23/test.jsonl"))
    assert bench == load_benchmark(SOURCES[2]) and len(bench.ids) == 40
    with pytest.raises(StorageError, match="s3://evals/missing.jsonl: no such object"):
        load_benchmark(BenchmarkSource(name="m", path="s3://evals/missing.jsonl"))


def test_an_index_built_for_another_config_is_refused(benchmarks, index):
    with pytest.raises(ValueError, match="ngram=13"):
        decontaminate(_train(0, 2), benchmarks, DecontaminationConfig(ngram=8), index=index)


# --- short items, lightly edited (bench/decontam.py plants the same edits at scale) -------------


def test_lightly_edited_short_items_are_caught_at_the_old_false_positive_rate(benchmarks, index):
    """Every benchmark item under 20 words, with each edit of bench/decontam.py (a word inserted, a
    verb swapped, `$` dropped, lower-cased, a preamble, and combinations): at least 98% caught, each
    as its own item; clean GSM8K train rows are flagged no more often than without the short-item rule."""
    from bench.decontam import EDITS, planted

    plants = planted(benchmarks, variants=1, long_sample=0, seed=5).filter(pl.col("set") == "short")
    assert plants.height == 51 * len(EDITS)  # 14 GSM8K, 4 AMC23 and 33 SVAMP items
    result = decontaminate(plants.select("sample_id", "question"), benchmarks, CFG, index=index)
    details = map(json.loads, result.rejects["detail"])
    caught = {s: (d["benchmark"], d["item"]) for s, d in zip(result.rejects["sample_id"], details, strict=True)}
    own = [caught.get(s) == (b, i) for s, b, i in plants.select("sample_id", "benchmark", "item").iter_rows()]
    assert sum(own) / len(own) >= 0.98
    assert result.count.rows_out == plants.height - len(caught)

    train = _train(0, 2000)
    old_cfg = DecontaminationConfig(benchmarks=SOURCES, short_item_words=0)  # rules 1 and 2 only
    old_rate = decontaminate(train, benchmarks, old_cfg).rejects.height / train.height
    new = decontaminate(train, benchmarks, CFG, index=index)
    assert new.rejects.height / train.height <= old_rate
    assert "edit_distance" not in {json.loads(d)["method"] for d in new.rejects["detail"]}


def test_the_edit_rule_names_the_item_the_edits_and_the_span(benchmarks, index):
    item = _item(benchmarks, "svamp", "43")
    assert item == "Kelly has 106 nintendo games. How many will she have left if she gives away 64 games?"
    edited = "Quick one: kelly owns 106 nintendo games. How many will she really have left if she gives away 64 games?"
    result = decontaminate(pl.DataFrame({"question": [edited], "completion": ["She has 42 left."]}), benchmarks, CFG, index=index)
    (detail,) = map(json.loads, result.rejects["detail"])
    found = (detail["benchmark"], detail["item"], detail["method"], detail["column"])
    assert found == ("svamp", "43", "edit_distance", "question")
    assert detail["edits"] == 2
    assert detail["span"] == "kelly owns 106 nintendo games how many will she really have left if she gives away 64 games"
    assert result.meta["contamination_hits"]["svamp"] == 1


def test_word_edits_keep_numbers_and_ignore_the_context():
    item = "kelly has 106 nintendo games how many will she have left if she gives away 64 games".split()
    assert word_edits(item, ["please", "answer", *item], 2) == (0, 2, 2 + len(item))
    swapped = "kelly owns 106 nintendo games how many will she really have left if she gives away 64 games".split()
    assert word_edits(item, swapped, 2) == (2, 0, len(swapped))
    assert word_edits(item, swapped, 1) is None
    other_numbers = "kelly has 50 nintendo games how many will she have left if she gives away 64 games".split()
    assert word_edits(item, other_numbers, 2) is None  # another problem of the same template
    extra_number = "kelly has 106 nintendo games how many will she have left if she gives away 5 64 games".split()
    assert word_edits(item, extra_number, 2) is None
    assert word_edits(item, item[:10], 2) is None  # most of it missing


def test_short_items_allow_edits_by_their_length():
    bench = Benchmark("tiny", ["a", "b"], ["What is 2 plus 2?", "Find the sum of 12 and 30 for the class."])
    questions = ["What is 2 times 2?", "Find the total sum of 12 and 30 for the class.", "What is 2 plus 2 ?"]
    rows = pl.DataFrame({"question": questions})
    result = decontaminate(rows, [bench], DecontaminationConfig(columns=["question"]))
    # the 4-word item allows no edit (only the whole item counts); the 10-word one allows one
    assert [json.loads(d)["item"] for d in result.rejects["detail"]] == ["b", "a"]
    assert [json.loads(d)["method"] for d in result.rejects["detail"]] == ["edit_distance", "ngram"]
    off = decontaminate(rows, [bench], DecontaminationConfig(columns=["question"], short_item_words=0))
    assert off.count.dropped == {"contaminated": 1}
