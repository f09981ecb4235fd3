"""lm-evaluation-harness's `local-completions` model drives the rollout service's /v1/completions unchanged, with a
local task file (skipped where lm-eval is not installed: it is not a gtpo dependency)."""

import json

import pytest

lm_eval = pytest.importorskip("lm_eval")

from tests.test_openai_serving import base_url  # noqa: E402,F401 - the uvicorn-served tiny model

TASK = """
task: gtpo_arith
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{ground_truth_answer}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 8
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def test_lm_eval_local_completions_runs_a_local_task(base_url, tmp_path, monkeypatch):  # noqa: F811
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"question": f"{a}+{a}=", "ground_truth_answer": str(2 * a)}) + "\n"
                            for a in range(1, 4)))  # fmt: skip
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "gtpo_arith.yaml").write_text(TASK.format(data=data))
    out = simple_evaluate(
        model="local-completions",
        model_args=f"model=tiny,base_url={base_url}/v1/completions,tokenizer_backend=None,num_concurrent=1,"
        "max_retries=1,tokenized_requests=False",
        tasks=["gtpo_arith"],
        task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
        limit=3,
    )
    result = out["results"]["gtpo_arith"]
    assert 0.0 <= result["exact_match,none"] <= 1.0  # a random tiny model: the harness ran end to end, scored 3
    assert out["n-samples"]["gtpo_arith"]["effective"] == 3
