"""``TaskRouter`` on its own: names to ids, every check, and the routing context managers."""

import pytest
import torch

from cgclora_lite.routing import TaskRouter, TaskRoutingError


@pytest.fixture
def router():
    return TaskRouter(["topic", "sentiment", "headline"])


def test_a_router_needs_unique_non_empty_names():
    assert TaskRouter(("a",)).tasks == ("a",)
    assert repr(TaskRouter(["a", "b"])) == "TaskRouter(tasks=['a', 'b'])"
    with pytest.raises(ValueError, match="^a router needs at least one task name$"):
        TaskRouter([])
    with pytest.raises(ValueError, match=r"unique, got \['a', 'a'\]"):
        TaskRouter(["a", "a"])
    for bad in (["a", ""], ["a", 3]):
        with pytest.raises(ValueError, match="non-empty strings"):
            TaskRouter(bad)


def test_names_and_ids_map_both_ways(router):
    assert [router.task_index(n) for n in router.tasks] == [0, 1, 2]
    assert [router.task_index(i) for i in (0, 1, 2)] == [0, 1, 2]
    with pytest.raises(TaskRoutingError, match=r"unknown task 'summary'; these adapters know \['topic'.*\]\. "
                       r"Check the spelling, or route the request to the cluster that has this task\.$"):
        router.task_index("summary")
    for bad in (3, -1):
        with pytest.raises(TaskRoutingError, match=f"task id {bad} is out of range: ids go from 0 to 2"):
            router.task_index(bad)
    for bad in (True, 1.0, None):
        with pytest.raises(TaskRoutingError, match="a task is a name or an int id"):
            router.task_index(bad)


def test_add_task_appends_and_returns_the_new_id(router):
    assert router.add_task("trivia") == 3
    assert router.tasks == ("topic", "sentiment", "headline", "trivia") and router.task_index("trivia") == 3
    with pytest.raises(ValueError, match="'topic' exists already"):
        router.add_task("topic")
    for bad in ("", 5):
        with pytest.raises(ValueError, match="a task name is a non-empty string"):
            router.add_task(bad)
    assert len(router.tasks) == 4


def test_to_ids_accepts_names_ints_and_tensors(router):
    for given in ("sentiment", 1, ["sentiment"], [1]):
        ids = router.to_ids(given)
        assert ids.dtype == torch.long and ids.tolist() == [1]
    assert router.to_ids(["headline", "topic", 1]).tolist() == [2, 0, 1]
    assert router.to_ids(torch.tensor([2, 0], dtype=torch.int32)).dtype == torch.long
    assert router.to_ids(torch.tensor([], dtype=torch.long)).tolist() == []
    assert router.to_ids([]).dtype == torch.long  # an empty batch too (torch would make it float)
    assert router.to_ids([0]).device.type == "cpu"
    assert router.to_ids([0], device="meta").device.type == "meta"  # moved where it is asked


def test_to_ids_rejects_what_cannot_be_ids(router):
    with pytest.raises(TaskRoutingError, match="integer tensor, got torch.float32"):
        router.to_ids(torch.tensor([0.0]))
    with pytest.raises(TaskRoutingError, match="integer tensor, got torch.bool"):
        router.to_ids(torch.tensor([True]))
    with pytest.raises(TaskRoutingError, match=r"shape \(batch,\), got \(1, 2\)"):
        router.to_ids(torch.tensor([[0, 1]]))
    with pytest.raises(TaskRoutingError, match="task id 3 is out of range"):
        router.to_ids(torch.tensor([0, 3, 1]))
    with pytest.raises(TaskRoutingError, match="task id -1 is out of range"):
        router.to_ids(torch.tensor([-1, 0]))
    with pytest.raises(TaskRoutingError, match="task id 3 is out of range"):
        router.to_ids(torch.tensor([2, 3]))  # the largest id alone is out of range
    with pytest.raises(TaskRoutingError, match="a task is a name or an int id"):
        router.to_ids(True)
    with pytest.raises(TaskRoutingError, match="a task is a name or an int id, got 0.5"):
        router.to_ids(0.5)


def test_route_sets_the_ids_for_the_block_and_restores_the_previous(router):
    assert router.task_ids is None
    with router.route(["headline", "topic"]) as ids:
        assert ids is router.task_ids and ids.tolist() == [2, 0]
        with router.route(None) as inner:
            assert inner is None and router.task_ids is None
        with router.route(1):
            assert router.task_ids.tolist() == [1]
        assert router.task_ids.tolist() == [2, 0]
    assert router.task_ids is None
    with pytest.raises(RuntimeError):
        with router.route([0]):
            raise RuntimeError
    assert router.task_ids is None  # restored after an error too


def test_disabled_turns_routing_off_for_the_block_only(router):
    assert router.enabled
    with router.disabled():
        assert not router.enabled
        with router.disabled():
            assert not router.enabled
        assert not router.enabled  # the inner block restores the outer state, not True
    assert router.enabled
    with pytest.raises(RuntimeError):
        with router.disabled():
            raise RuntimeError
    assert router.enabled
