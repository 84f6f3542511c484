import yaml
from click.testing import CliRunner

from kubefly.cli.main import cli
from kubefly.secrets import sealing

KEY = sealing.generate()


def run(tmp_path, *args):
    pub = tmp_path / "pub"
    pub.write_text(sealing.encode_public(KEY.public_key()))
    return CliRunner().invoke(cli, ["secrets", "seal", "--public-key", str(pub), *args])


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
