"""What a flow run shows on its Prefect page: the evaluation table and the gate's decision, as Markdown
artifacts (``opsd-eval``, ``opsd-gate``), beside the logs of each stage."""

from __future__ import annotations

from typing import Any

from prefect.artifacts import create_markdown_artifact

from opsd_core.evaluation.summary import task_summary
from opsd_core.registry import card, decision


def eval_table(report: dict[str, Any]) -> str:
    """``reports/eval.json`` as a Markdown table: one row per task, base and candidate with their 95% intervals
    (as the model card shows them: cut to [0, 1] for accuracies only), gain and its paired bootstrap interval."""
    lines = ["| task | base | candidate | candidate - base | 95% CI | problems | metric |",
             "|---|---|---|---|---|---|---|"]
    for task, row in task_summary(report).items():
        entry = report["tasks"][task]
        ci = f"[{row['gain_ci_low']:+.4f}, {row['gain_ci_high']:+.4f}]" if row["gain_ci_low"] is not None else "-"
        gain = f"{row['gain']:+.4f}" if row["gain"] is not None else "-"
        problems = row["problems"] if row["problems"] is not None else "-"
        lines.append(f"| {task} | {card.score_cell(task, entry['base'])} | {card.score_cell(task, entry['candidate'])} "
                     f"| {gain} | {ci} | {problems} | {card.metric_name(task, entry['candidate'])} |")
    return "\n".join(lines)


def mlflow_link(registry: dict[str, Any]) -> str:
    """Where the run's MLflow record is: a link when the tracking server has a URL, else the run id and the
    command that opens the local store's UI."""
    run, uri, exp = registry.get("run_id"), str(registry.get("tracking_uri") or ""), registry.get("experiment_id")
    if not run:
        return ""
    if uri.startswith(("http://", "https://")) and exp:
        return f"MLflow run: [{run}]({uri.rstrip('/')}/#/experiments/{exp}/runs/{run})\n\n"
    return f"MLflow run `{run}` (experiment {exp}) in `{uri}`: open it with `mlflow ui --backend-store-uri {uri}`\n\n"


def publish(eval_report: dict[str, Any] | None, registry: dict[str, Any] | None) -> list[str]:
    """Create the artifacts this run has results for (inside a flow or task run); returns their keys."""
    keys = []
    if eval_report:
        create_markdown_artifact(key="opsd-eval", markdown=eval_table(eval_report),
                                 description="base and candidate on every evaluation task (reports/eval.json): each score "
                                             "with its 95% interval in brackets, the gain with its paired "
                                             "bootstrap 95% CI")
        keys.append("opsd-eval")
    if registry and registry.get("verdict"):
        head = f"**Model {registry.get('model_name')} version {registry.get('version')}**\n\n" + mlflow_link(registry)
        create_markdown_artifact(key="opsd-gate", markdown=head + decision.render(registry["verdict"], markdown=True),
                                 description="the promotion gate's decision (reports/registry.json)")
        keys.append("opsd-gate")
    return keys
