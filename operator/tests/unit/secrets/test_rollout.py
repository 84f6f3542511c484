from kubefly.secrets.rollout import AppSecretView, Done, MachineView, Progress, Roll, Wait, desired_digest, next_step

SECRETS = [AppSecretView("db", "new"), AppSecretView("api", "a1")]
TARGET = "a1,new"


def m(name, digest=None, started=True, ready=True, instance="i1", secrets=None):
    return MachineView(name, started, ready, instance, secrets, digest)


def test_rolls_started_machines_in_name_order_one_at_a_time():
    machines = [m("web-2", "a1,old"), m("web-1", "a1,old"), m("web-3", "a1,old", started=False)]
    assert next_step("db", SECRETS, machines, None) == Roll("web-1", TARGET, "i1")


def test_waits_until_the_rolled_machine_is_ready_as_a_new_instance():
    progress = Progress("web-1", "i1")
    rolling = [m("web-1", TARGET, instance="i1"), m("web-2", "a1,old")]
    assert next_step("db", SECRETS, rolling, progress) == Wait("web-1")
    not_ready = [m("web-1", TARGET, instance="i2", ready=False), m("web-2", "a1,old")]
    assert next_step("db", SECRETS, not_ready, progress) == Wait("web-1")
    replaced = [m("web-1", TARGET, instance="i2"), m("web-2", "a1,old", instance="j1")]
    assert next_step("db", SECRETS, replaced, progress) == Roll("web-2", TARGET, "j1")


def test_a_machine_deleted_or_stopped_mid_roll_is_not_waited_for():
    progress = Progress("web-1", "i1")
    assert next_step("db", SECRETS, [m("web-2", "a1,old")], progress) == Roll("web-2", TARGET, "i1")
    stopped = [m("web-1", TARGET, started=False), m("web-2", TARGET)]
    assert next_step("db", SECRETS, stopped, progress) == Done()


def test_done_when_every_started_machine_has_the_digest():
    assert next_step("db", SECRETS, [m("web-1", TARGET), m("web-2", None, started=False)], None) == Done()


def test_machines_that_do_not_get_this_appsecret_are_left_alone():
    only_api = m("web-1", "a1", secrets=("api",))
    assert desired_digest(only_api, SECRETS) == "a1"
    assert next_step("db", SECRETS, [only_api], None) == Done()


def test_a_machine_without_any_digest_yet_is_rolled():
    assert next_step("db", SECRETS, [m("web-1", None, instance=None)], None) == Roll("web-1", TARGET, None)
