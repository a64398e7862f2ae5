"""prefect.yaml's ``retrain-cnc/local``: valid parameters, a slugged cron schedule, one run at a time,
and an event trigger that Prefect's own models parse, that fires on ``cnc.triplets.committed``
only, and that hands the committed output to the flow as ``data``."""

from __future__ import annotations

import copy
import datetime
import uuid
from pathlib import Path

import pytest
import yaml

from flows.retrain_params import RetrainParams

ROOT = Path(__file__).resolve().parents[2]


def deployment() -> dict:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (dep,) = [d for d in spec["deployments"] if d["entrypoint"] == "flows/retrain_flow.py:retrain_cnc"]
    return dep


def event(name: str, resource_id: str):
    from prefect.server.events.schemas.events import ReceivedEvent

    return ReceivedEvent(occurred=datetime.datetime.now(datetime.timezone.utc), event=name,
                         resource={"prefect.resource.id": resource_id}, id=uuid.uuid4())


def test_the_deployment_has_a_slugged_schedule_and_one_run_at_a_time():
    dep = deployment()
    assert dep["name"] == "local" and dep["concurrency_limit"] == 1
    params = RetrainParams(**dep["parameters"]["params"])
    assert (params.stage, params.preset) == ("full", "tiny")
    (schedule,) = dep["schedules"]
    assert schedule["slug"] and schedule["cron"]
    from prefect.client.schemas.schedules import CronSchedule

    CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])  # a cron Prefect accepts


def test_the_trigger_fires_on_committed_triplets_with_their_url():
    from prefect.cli.deploy._triggers import _initialize_deployment_triggers
    from prefect.server.events.actions import RunDeployment
    from prefect.server.events.schemas.automations import EventTrigger
    from prefect.utilities.schema_tools.hydration import HydrationContext, hydrate

    dep = deployment()
    (trigger,) = _initialize_deployment_triggers("retrain-cnc/local", copy.deepcopy(dep["triggers"]))
    trigger.set_deployment_id(uuid.uuid4())
    automation = trigger.as_automation()  # what `prefect deploy` sends to the server
    server_trigger = EventTrigger.model_validate(automation.trigger.model_dump())
    committed = event("cnc.triplets.committed", "cnc.triplets.s3://bucket/new-build")
    assert server_trigger.covers(committed)
    assert not server_trigger.covers(event("cnc.ingest.committed", "cnc.triplets.s3://bucket/new-build"))
    assert not server_trigger.covers(event("cnc.triplets.committed", "cnc.ingest.s3://bucket/new-build"))
    (action,) = automation.actions
    parameters = copy.deepcopy(action.parameters)
    RunDeployment._upgrade_v1_templates(parameters)  # as the server renders a run-deployment action
    rendered = hydrate(parameters, HydrationContext(render_jinja=True, jinja_context={"event": committed},
                                                    raise_on_error=True))
    params = RetrainParams(**rendered["params"])
    assert params.data == "s3://bucket/new-build"
    defaults = RetrainParams(**dep["parameters"]["params"])
    assert params.model_dump() == {**defaults.model_dump(), "data": "s3://bucket/new-build"}


@pytest.mark.parametrize("metric", ["fid", "both.nonsense", "depth.fid"])
def test_a_metric_outside_the_evaluated_settings_is_refused(metric):
    base = deployment()["parameters"]["params"]  # evaluates "both" only
    with pytest.raises(ValueError, match="must be <setting>.<name>"):
        RetrainParams(**{**base, "metric": metric})
