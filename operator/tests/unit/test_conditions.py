from kubefly.conditions import get_condition, set_condition


def test_new_condition_is_appended_with_generation():
    out = set_condition([], "Ready", True, "Started", "machine is started", 3, now="T1")
    assert out == [
        {"type": "Ready", "status": "True", "reason": "Started", "message": "machine is started",
         "lastTransitionTime": "T1", "observedGeneration": 3}
    ]


def test_transition_time_kept_when_status_unchanged_and_moved_when_changed():
    first = set_condition([], "Ready", False, "Starting", "waiting", 1, now="T1")
    same = set_condition(first, "Ready", False, "Pulling", "pulling image", 2, now="T2")
    assert get_condition(same, "Ready")["lastTransitionTime"] == "T1"
    assert get_condition(same, "Ready")["reason"] == "Pulling"
    flipped = set_condition(same, "Ready", True, "Started", "ok", 2, now="T3")
    assert get_condition(flipped, "Ready")["lastTransitionTime"] == "T3"


def test_other_conditions_untouched_and_order_kept():
    conds = set_condition([], "A", True, "R", "m", 1, now="T1")
    conds = set_condition(conds, "B", False, "R", "m", 1, now="T1")
    conds = set_condition(conds, "A", False, "R2", "m2", 2, now="T2")
    assert [c["type"] for c in conds] == ["A", "B"]
    assert get_condition(conds, "B")["status"] == "False"
    assert get_condition(conds, "C") is None
