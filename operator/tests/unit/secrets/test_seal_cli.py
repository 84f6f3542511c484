import pytest
import yaml
from click.testing import CliRunner

from kubefly.cli.main import cli
from kubefly.secrets import sealing

KEY = sealing.generate()


def run(tmp_path, *args, kubeconfig="none"):
    pub = tmp_path / "pub"
    pub.write_text(sealing.encode_public(KEY.public_key()))
    env = {"KUBECONFIG": str(tmp_path / kubeconfig)}
    return CliRunner().invoke(cli, ["secrets", "seal", "--public-key", str(pub), *args], env=env)


def write_kubeconfig(path, current, namespace=None):
    """A kubeconfig whose current context names `namespace`, beside another context that names another."""
    context = {"cluster": "c", "user": "u", **({"namespace": namespace} if namespace else {})}
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": current,
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "elsewhere", "context": {"cluster": "c", "user": "u", "namespace": "not-this-org"}},
                     {"name": current, "context": context}],
    }))


def test_seal_prints_an_appsecret_that_opens_only_for_its_app(tmp_path):
    env = tmp_path / "env"
    env.write_text("# comment\nexport TOKEN='t0k'\n\nB=two\n")
    out = run(tmp_path, "--app", "web", "-n", "org", "--from-env-file", str(env), "A=one=1", "B=override", "--stage")
    assert out.exit_code == 0, out.output
    doc = yaml.safe_load(out.output)
    assert doc["kind"] == "AppSecret" and doc["metadata"] == {"name": "web", "namespace": "org"}
    assert doc["spec"]["stage"] is True
    data = doc["spec"]["data"]
    assert sorted(data) == ["A", "B", "TOKEN"]
    opened = {k: sealing.unseal(KEY, v, namespace="org", app="web", key=k) for k, v in data.items()}
    assert opened == {"A": "one=1", "B": "override", "TOKEN": "t0k"}
    assert "one=1" not in out.output and "t0k" not in out.output


def test_bad_input_names_the_problem(tmp_path):
    bad_key = run(tmp_path, "--app", "web", "1BAD=x")
    assert bad_key.exit_code != 0 and "'1BAD' is not an environment variable name" in bad_key.output
    no_equals = run(tmp_path, "--app", "web", "JUSTKEY")
    assert no_equals.exit_code != 0 and "not KEY=VALUE" in no_equals.output
    bad_app = run(tmp_path, "--app", "Web_App", "A=1")
    assert bad_app.exit_code != 0 and "spec.app" in bad_app.output
    nothing = run(tmp_path, "--app", "web")
    assert nothing.exit_code != 0 and "nothing to seal" in nothing.output


def test_a_file_that_is_not_a_public_key_is_refused(tmp_path):
    pub = tmp_path / "junk"
    pub.write_text("hello")
    out = CliRunner().invoke(cli, ["secrets", "seal", "--public-key", str(pub), "--app", "web", "A=1"])
    assert out.exit_code != 0 and "--public-key" in out.output


def sealed_namespace(out) -> str:
    assert out.exit_code == 0, out.output
    doc = yaml.safe_load(out.stdout)  # stdout is the manifest alone: it pipes into kubectl apply
    namespace = doc["metadata"]["namespace"]
    # The seal binds that namespace: the value opens there and nowhere else.
    value = doc["spec"]["data"]["A"]
    assert sealing.unseal(KEY, value, namespace=namespace, app="web", key="A") == "1"
    if namespace != "default":
        with pytest.raises(sealing.UnsealError):
            sealing.unseal(KEY, value, namespace="default", app="web", key="A")
    return namespace


def test_the_namespace_comes_from_the_kubeconfig_context_as_kubectl_takes_it(tmp_path):
    write_kubeconfig(tmp_path / "kubeconfig", current="kind-kubefly", namespace="my-org")
    out = run(tmp_path, "--app", "web", "A=1", kubeconfig="kubeconfig")
    assert sealed_namespace(out) == "my-org"
    assert "sealed for namespace my-org (the namespace of kubeconfig context 'kind-kubefly')" in out.stderr


def test_n_wins_over_the_context(tmp_path):
    write_kubeconfig(tmp_path / "kubeconfig", current="kind-kubefly", namespace="my-org")
    out = run(tmp_path, "--app", "web", "-n", "other-org", "A=1", kubeconfig="kubeconfig")
    assert sealed_namespace(out) == "other-org"
    assert "sealed for namespace other-org (from -n)" in out.stderr


def test_default_only_when_the_context_names_no_namespace(tmp_path):
    write_kubeconfig(tmp_path / "kubeconfig", current="kind-kubefly")
    out = run(tmp_path, "--app", "web", "A=1", kubeconfig="kubeconfig")
    assert sealed_namespace(out) == "default"
    assert "sealed for namespace default (kubeconfig context 'kind-kubefly' names no namespace)" in out.stderr
    no_file = run(tmp_path, "--app", "web", "A=1", kubeconfig="missing")
    assert sealed_namespace(no_file) == "default"
    assert "sealed for namespace default (no kubeconfig context found)" in no_file.stderr


def test_a_kubeconfig_path_list_is_merged_as_kubectl_merges_it(tmp_path):
    # The first file that sets current-context wins; contexts come from any file.
    write_kubeconfig(tmp_path / "a", current="kind-kubefly", namespace="from-a")
    (tmp_path / "b").write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Config", "current-context": "elsewhere"}))
    out = run(tmp_path, "--app", "web", "A=1", kubeconfig=f"a:{tmp_path / 'b'}")
    assert sealed_namespace(out) == "from-a"
