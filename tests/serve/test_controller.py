"""Controller: registry, heartbeats, expiry and dispatch (with a fake clock), then every HTTP endpoint."""

from __future__ import annotations

import random
import time
from collections import Counter

import httpx
import pytest
from fastapi import FastAPI
from servers import serve_app, unused_port

from longserve.config import ServeConfig
from longserve.serve.controller import Controller
from longserve.serve.controller_app import create_controller_app
from longserve.serve.worker_protocol import (
    ControllerStatus,
    ErrorInfo,
    GetWorkerAddressResponse,
    HeartBeatResponse,
    ListModelsResponse,
    ListWorkersResponse,
    WorkerStatus,
)

A = "http://127.0.0.1:9001"
B = "http://127.0.0.1:9002"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_controller(method: str = "shortest_queue", seed: int = 0) -> tuple[Controller, FakeClock]:
    clock = FakeClock()
    return Controller(method, heart_beat_expiration_s=30.0, clock=clock, rng=random.Random(seed)), clock


def status(*models: str, speed: float = 1.0, queue_length: int = 0) -> WorkerStatus:
    return WorkerStatus(model_names=list(models), speed=speed, queue_length=queue_length)


# ---- Controller logic ---------------------------------------------------------------------------------------


def test_equal_queues_spread_over_both_workers() -> None:
    controller, _ = make_controller()
    controller.register(A, status("m"))
    controller.register(B, status("m"))
    picks = Counter(controller.get_worker_address("m") for _ in range(10))
    assert picks == {A: 5, B: 5}  # each pick counts as queued, so the other worker is next
    assert sorted(w.status.queue_length for w in controller.list_workers()) == [5, 5]


def test_a_look_up_is_not_counted_as_load() -> None:
    controller, _ = make_controller()
    controller.register(A, status("m"))
    controller.register(B, status("m"))
    assert [controller.get_worker_address("m", dispatch=False) for _ in range(3)] == [A, A, A]
    assert [w.status.queue_length for w in controller.list_workers()] == [0, 0]


def test_ties_are_broken_randomly() -> None:
    firsts = set()
    for seed in range(20):
        controller, _ = make_controller(seed=seed)
        controller.register(A, status("m"))
        controller.register(B, status("m"))
        firsts.add(controller.get_worker_address("m"))
    assert firsts == {A, B}


def test_shortest_queue_prefers_less_loaded_then_faster() -> None:
    controller, _ = make_controller()
    controller.register(A, status("m", queue_length=3))
    controller.register(B, status("m", queue_length=1))
    assert controller.get_worker_address("m") == B

    controller, _ = make_controller()
    controller.register(A, status("m", speed=1.0, queue_length=4))  # load 4
    controller.register(B, status("m", speed=4.0, queue_length=8))  # load 2
    assert [controller.get_worker_address("m") for _ in range(8)] == [B] * 8  # B reaches load 4 after 8
    assert controller.get_worker_address("m") in (A, B)


def test_heartbeat_updates_queue_length_used_by_dispatch() -> None:
    controller, _ = make_controller()
    controller.register(A, status("m"))
    controller.register(B, status("m"))
    assert controller.heart_beat(A, queue_length=10)
    assert controller.get_worker_address("m") == B


def test_lottery_follows_speed() -> None:
    controller, _ = make_controller("lottery", seed=1234)
    controller.register(A, status("m", speed=1.0))
    controller.register(B, status("m", speed=3.0))
    picks = Counter(controller.get_worker_address("m") for _ in range(4000))
    assert picks[B] / 4000 == pytest.approx(0.75, abs=0.03)


def test_lottery_with_no_speed_draws_uniformly() -> None:
    controller, _ = make_controller("lottery")
    controller.register(A, status("m", speed=0.0))
    controller.register(B, status("m", speed=0.0))
    assert set(controller.get_worker_address("m") for _ in range(50)) == {A, B}


def test_exclude_is_honoured() -> None:
    for method in ("shortest_queue", "lottery"):
        controller, _ = make_controller(method)
        controller.register(A, status("m"))
        controller.register(B + "/", status("m"))  # trailing slash: same worker as B
        assert {controller.get_worker_address("m", exclude=[A]) for _ in range(10)} == {B}
        assert {controller.get_worker_address("m", exclude=[B + "/"]) for _ in range(10)} == {A}
        assert controller.get_worker_address("m", exclude=[A, B]) == ""


def test_a_reported_worker_is_skipped_until_its_next_heartbeat() -> None:
    controller, _ = make_controller()
    controller.register(A, status("m"))
    controller.register(B, status("m", queue_length=50))
    assert controller.suspend(A, "stream read timed out")
    assert {controller.get_worker_address("m") for _ in range(5)} == {B}  # busier, but alive
    assert controller.list_models() == ["m"]  # still listed: it may only be slow
    controller.heart_beat(A, 0)
    assert controller.get_worker_address("m") == A
    controller.suspend(B)
    controller.suspend(A)
    assert controller.get_worker_address("m") == ""  # nobody answers: the API server says 503
    assert controller.update_status(B, status("m"))  # a status poll counts as a heartbeat
    assert controller.get_worker_address("m") == B
    assert not controller.suspend("http://nobody:1")


def test_unknown_model_gets_empty_address() -> None:
    controller, _ = make_controller()
    controller.register(A, status("m"))
    assert controller.get_worker_address("other") == ""


def test_expired_worker_is_not_dispatched_and_is_removed() -> None:
    controller, clock = make_controller()
    controller.register(A, status("m"))
    controller.register(B, status("m"))
    clock.now += 20
    assert controller.heart_beat(B, 0)
    clock.now += 15  # A silent for 35 s > 30 s; B for 15 s
    assert {controller.get_worker_address("m") for _ in range(10)} == {B}  # before any sweep
    assert controller.expire() == [A]
    assert [w.worker_address for w in controller.list_workers()] == [B]
    assert not controller.heart_beat(A, 0)  # A must register again


def test_expire_keeps_workers_at_the_deadline() -> None:
    controller, clock = make_controller()
    controller.register(A, status("m"))
    assert controller.expire(now=clock.now + 30.0) == []
    assert controller.expire(now=clock.now + 30.5) == [A]


def test_unchecked_worker_never_expires() -> None:
    controller, clock = make_controller()
    controller.register(A, status("m"), check_heart_beat=False)
    clock.now += 10_000
    assert controller.expire() == []
    assert controller.get_worker_address("m") == A
    assert controller.list_models() == ["m"]


def test_unknown_heartbeat_returns_false() -> None:
    controller, _ = make_controller()
    assert controller.heart_beat(A, 3) is False


def test_list_models_is_sorted_union_of_live_workers() -> None:
    controller, clock = make_controller()
    controller.register(A, status("zeta", "alpha"))
    controller.register(B, status("alpha", "mid"))
    assert controller.list_models() == ["alpha", "mid", "zeta"]
    clock.now += 31
    controller.heart_beat(B, 0)
    assert controller.list_models() == ["alpha", "mid"]


def test_register_replaces_and_remove_forgets() -> None:
    controller, _ = make_controller()
    controller.register(A, status("m", queue_length=2))
    controller.register(A, status("n"))
    assert [(w.worker_address, w.status.model_names) for w in controller.list_workers()] == [(A, ["n"])]
    assert controller.remove(A) and not controller.remove(A)
    assert controller.list_workers() == []


def test_status_aggregates_live_workers() -> None:
    controller, _ = make_controller()
    controller.register(A, status("m", speed=1.5, queue_length=2))
    controller.register(B, status("n", speed=2.0, queue_length=3))
    assert controller.status() == ControllerStatus(
        model_names=["m", "n"], num_workers=2, speed=3.5, queue_length=5
    )


def test_bad_dispatch_method_rejected() -> None:
    with pytest.raises(ValueError, match="dispatch_method"):
        Controller("round_robin")


# ---- HTTP ---------------------------------------------------------------------------------------------------


def fake_worker_app(worker_status: WorkerStatus) -> FastAPI:
    app = FastAPI()

    @app.post("/worker_get_status")
    async def worker_get_status() -> WorkerStatus:
        return worker_status

    return app


def register(client: httpx.Client, address: str, worker_status: WorkerStatus, check: bool = True) -> None:
    body = {
        "worker_address": address,
        "worker_status": worker_status.model_dump(),
        "check_heart_beat": check,
    }
    response = client.post("/register_worker", json=body)
    assert response.status_code == 200, response.text


def test_http_endpoints() -> None:
    app = create_controller_app(ServeConfig())
    with serve_app(app) as base_url, httpx.Client(base_url=base_url, trust_env=False) as client:
        assert client.get("/health").json() == {"status": "ok"}
        register(client, A, status("m", "x", speed=2.0))
        register(client, B, status("m"))

        models = ListModelsResponse.model_validate(client.post("/list_models").json())
        assert models.models == ["m", "x"]

        workers = ListWorkersResponse.model_validate(client.post("/list_workers").json()).workers
        assert [w.worker_address for w in workers] == [A, B]
        assert workers[0].status.speed == 2.0 and workers[0].check_heart_beat

        beat = client.post("/receive_heart_beat", json={"worker_address": A, "queue_length": 7})
        assert HeartBeatResponse.model_validate(beat.json()).exist
        beat = client.post("/receive_heart_beat", json={"worker_address": "http://nobody:1"})
        assert HeartBeatResponse.model_validate(beat.json()).exist is False

        pick = client.post("/get_worker_address", json={"model": "m"})
        assert GetWorkerAddressResponse.model_validate(pick.json()).address == B  # A has 7 queued
        pick = client.post("/get_worker_address", json={"model": "m", "exclude": [B]})
        assert pick.json() == {"address": A}
        assert client.post("/get_worker_address", json={"model": "nope"}).json() == {"address": ""}

        agg = ControllerStatus.model_validate(client.post("/worker_get_status").json())
        assert agg == ControllerStatus(model_names=["m", "x"], num_workers=2, speed=3.0, queue_length=9)

        reported = client.post("/report_unresponsive_worker", json={"worker_address": B, "reason": "timeout"})
        assert reported.json() == {"ok": True}
        assert client.post("/get_worker_address", json={"model": "m"}).json() == {"address": A}


def test_http_malformed_body_gets_400_error_info() -> None:
    app = create_controller_app(ServeConfig())
    with serve_app(app) as base_url, httpx.Client(base_url=base_url, trust_env=False) as client:
        response = client.post("/get_worker_address", json={"exclude": []})
        assert response.status_code == 400
        error = ErrorInfo.model_validate(response.json())
        assert error.param == "model" and error.status == 400
        response = client.post(
            "/register_worker", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert response.status_code == 400
        ErrorInfo.model_validate(response.json())


def test_http_refresh_all_workers_drops_unreachable() -> None:
    app = create_controller_app(ServeConfig())
    live_status = status("m", speed=3.0, queue_length=4)
    with (
        serve_app(fake_worker_app(live_status)) as worker_url,
        serve_app(app) as base_url,
        httpx.Client(base_url=base_url, trust_env=False) as client,
    ):
        dead_url = f"http://127.0.0.1:{unused_port()}"
        register(client, worker_url, status("m"))
        register(client, dead_url, status("m"), check=False)
        workers = ListWorkersResponse.model_validate(client.post("/refresh_all_workers").json()).workers
        assert [(w.worker_address, w.status) for w in workers] == [(worker_url, live_status)]
        listed = ListWorkersResponse.model_validate(client.post("/list_workers").json()).workers
        assert [w.worker_address for w in listed] == [worker_url]


def test_http_background_expiry() -> None:
    config = ServeConfig(heart_beat_interval_s=0.2, heart_beat_expiration_s=0.6)
    app = create_controller_app(config)
    with serve_app(app) as base_url, httpx.Client(base_url=base_url, trust_env=False) as client:
        register(client, A, status("m"))
        register(client, B, status("m"), check=False)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            listed = ListWorkersResponse.model_validate(client.post("/list_workers").json()).workers
            if [w.worker_address for w in listed] == [B]:
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"worker A was not expired: {listed}")
        # A heartbeat from the expired worker tells it to register again.
        beat = client.post("/receive_heart_beat", json={"worker_address": A, "queue_length": 0})
        assert beat.json() == {"exist": False}
    task = app.state.controller_state.expiry_task
    assert task is not None and task.cancelled()  # lifespan exit stopped the sweep


def test_http_heartbeats_keep_worker_alive() -> None:
    config = ServeConfig(heart_beat_interval_s=0.2, heart_beat_expiration_s=0.6)
    app = create_controller_app(config)
    with serve_app(app) as base_url, httpx.Client(base_url=base_url, trust_env=False) as client:
        register(client, A, status("m"))
        for _ in range(8):  # 1.6 s of heartbeats, well past one expiration window
            time.sleep(0.2)
            beat = client.post("/receive_heart_beat", json={"worker_address": A, "queue_length": 1})
            assert beat.json() == {"exist": True}
        assert client.post("/list_models").json()["models"] == ["m"]
