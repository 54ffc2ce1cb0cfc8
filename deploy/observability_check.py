"""Checks the operator's view against a real broker: starts the broker binary given as the only
argument (embedded store, built-in demo agent), drives a short workload, scrapes /metrics, and
then checks

- the scrape with `promtool check metrics`;
- the alerts with `promtool check rules` and `promtool test rules`, and that each alert has a
  severity, a summary, a description, a runbook_url whose anchor is a heading of RUNBOOKS.md,
  and unit tests that show it firing and not firing;
- the Grafana dashboard's structure (importable, data source and region/instance variables,
  every panel titled, on ${datasource}, with queries);
- the runbooks' links between sections;
- every expression of the dashboard (its variables' too), the alerts and the runbooks (```promql
  blocks): its syntax with promtool, and each metric name, label matcher, grouping label (by,
  without, on, ignoring, group_left/right), label used by histogram_quantile and label_replace,
  and label named in a legend or an alert template, against the series of the scrape plus the
  target labels the scrape configuration adds.

Run it through deploy/observability-check.sh. Exits 1 if any check fails; metrics the broker
does not export are failures, listed by name with the panels and alerts that need them.
"""

import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import websockets
import yaml

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy/grafana/session-broker.json"
ALERTS = ROOT / "deploy/prometheus/alerts.yml"
ALERT_TESTS = ROOT / "deploy/prometheus/alerts_test.yml"
RUNBOOKS = ROOT / "deploy/RUNBOOKS.md"
# The one place that says which labels Prometheus adds at scrape time (see target_labels()).
SCRAPE_CONFIG = ROOT / "deploy/kubernetes/base/prometheus-scrape.yml"

# Where /metrics is served, from the fields of the broker's "session broker ready" log line.
# /metrics is served on the internal listener only; the broker logs the address it bound as
# `internal_listen` in its ready line, as it logs `listen`.
METRICS_URL = "http://{internal_listen}/metrics"

# The demo the broker serves with --demo (README, quickstart).
DEMO_KEY = "pk_demo"
DEMO_AGENT = "echo"
# Seconds to wait for the broker to start, and for a session's end to be counted.
START_TIMEOUT = 20
SETTLE_TIMEOUT = 5

# Labels Prometheus adds to every target whatever its configuration.
PROMETHEUS_TARGET_LABELS = {"job", "instance"}
# Series Prometheus records for each target itself; they carry the target labels only.
SCRAPE_SERIES = {
    "up", "scrape_duration_seconds", "scrape_samples_scraped",
    "scrape_samples_post_metric_relabeling", "scrape_series_added",
}
# What Grafana puts in place of its variables before a query reaches Prometheus.
GRAFANA_VARIABLES = {
    "__rate_interval": "1m", "__interval": "15s", "__range": "6h",
    "region": ".*", "instance": ".*",
}

AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}
AGGREGATIONS_WITH_PARAMETER = {
    "count_values", "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}
# Aggregations that pick series rather than combine them: the series keep their labels.
SELECTING_AGGREGATIONS = {"bottomk", "topk", "limitk", "limit_ratio"}
FUNCTIONS = {
    "abs", "absent", "absent_over_time", "acos", "acosh", "asin", "asinh", "atan", "atanh",
    "avg_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min", "cos", "cosh",
    "count_over_time", "day_of_month", "day_of_week", "day_of_year", "days_in_month", "deg",
    "delta", "deriv", "exp", "floor", "histogram_avg", "histogram_count", "histogram_fraction",
    "histogram_quantile", "histogram_stddev", "histogram_stdvar", "histogram_sum", "holt_winters",
    "hour", "idelta", "increase", "irate", "label_join", "label_replace", "last_over_time", "ln",
    "log10", "log2", "mad_over_time", "max_over_time", "min_over_time", "minute", "month", "pi",
    "predict_linear", "present_over_time", "quantile_over_time", "rad", "rate", "resets", "round",
    "scalar", "sgn", "sin", "sinh", "sort", "sort_by_label", "sort_by_label_desc", "sort_desc",
    "sqrt", "stddev_over_time", "stdvar_over_time", "sum_over_time", "tan", "tanh", "time",
    "timestamp", "vector", "year",
}
BINARY_PRECEDENCE = {
    "or": 1, "and": 2, "unless": 2,
    "==": 3, "!=": 3, "<": 3, ">": 3, "<=": 3, ">=": 3,
    "+": 4, "-": 4, "*": 5, "/": 5, "%": 5, "atan2": 5, "^": 6,
}
SET_OPERATORS = {"and", "or", "unless"}

TOKEN = re.compile(r"""
    (?P<space>\s+|\#[^\n]*)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<range>\[[^\]]*\])
  | (?P<duration>\d+(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*(?![\w.]))
  | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<op>==|!=|<=|>=|=~|!~|[-+*/%^<>=(){},@])
""", re.VERBOSE)


class Scrape:
    """The series of one scrape: label names and values by series name, and the families'
    types."""

    def __init__(self, text):
        self.labels = {}
        self.types = {}
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(" ", 3)
                self.types[name] = kind
            elif line and not line.startswith("#"):
                match = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s", line)
                assert match, f"unparsable sample line: {line}"
                series = self.labels.setdefault(match.group(1), {})
                for label, value in re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""):
                    series.setdefault(label, set()).add(value)

    def family(self, name):
        """The metric family a series name belongs to (a histogram's _bucket, _sum, _count)."""
        for suffix in ("_bucket", "_sum", "_count"):
            base = name.removesuffix(suffix)
            if base != name and self.types.get(base) in ("histogram", "summary"):
                return base
        return name


class Report:
    def __init__(self):
        self.failures = []
        self.notes = []
        self.missing = {}

    def fail(self, where, message):
        self.failures.append(f"{where}: {message}")

    def note(self, where, message):
        self.notes.append(f"{where}: {message}")

    def missing_metric(self, name, where):
        self.missing.setdefault(name, []).append(where)


class Value:
    """What an expression evaluates to, as far as labels go: its kind (scalar, string, vector)
    and the label names its series may carry (None: unknown, after an error already reported)."""

    def __init__(self, kind, labels=None, text=None, equal=()):
        self.kind, self.labels, self.text, self.equal = kind, labels, text, set(equal)


class Analysis:
    """Parses one PromQL expression, handing each selector, aggregation, call and operator to
    the checker, which knows the scrape."""

    def __init__(self, expr, where, context):
        self.where, self.context = where, context
        self.tokens = []
        position = 0
        while position < len(expr):
            match = TOKEN.match(expr, position)
            if not match:
                raise SyntaxError(f"cannot read {expr[position:position + 20]!r}")
            position = match.end()
            if match.lastgroup != "space":
                self.tokens.append((match.lastgroup, match.group()))
        self.position = 0

    def run(self):
        value = self.expression(0)
        if self.peek() is not None:
            raise SyntaxError(f"unexpected {self.peek()!r}")
        return value

    # Token access.
    def peek(self, ahead=0):
        index = self.position + ahead
        return self.tokens[index][1] if index < len(self.tokens) else None

    def kind(self):
        return self.tokens[self.position][0] if self.position < len(self.tokens) else None

    def take(self, expected=None):
        if self.position >= len(self.tokens):
            raise SyntaxError("unexpected end")
        text = self.tokens[self.position][1]
        if expected is not None and text != expected:
            raise SyntaxError(f"expected {expected!r}, found {text!r}")
        self.position += 1
        return text

    def accept(self, *words):
        if self.peek() in words:
            return self.take()
        return None

    def label_list(self):
        self.take("(")
        labels = []
        while self.peek() != ")":
            labels.append(self.take())
            self.accept(",")
        self.take(")")
        return labels

    # Grammar.
    def expression(self, least):
        left = self.unary()
        while True:
            operator = self.peek()
            precedence = BINARY_PRECEDENCE.get(operator)
            if precedence is None or precedence < least:
                return left
            self.take()
            self.accept("bool")
            matching = grouping = None
            if self.peek() in ("on", "ignoring"):
                matching = (self.take(), self.label_list())
            if self.peek() in ("group_left", "group_right"):
                side = self.take()
                grouping = (side, self.label_list() if self.peek() == "(" else [])
            # ^ is right-associative, the others left-associative.
            right = self.expression(precedence if operator == "^" else precedence + 1)
            left = self.context.binary(self.where, operator, left, right, matching, grouping)

    def unary(self):
        if self.accept("-", "+"):
            return self.unary()
        return self.postfix(self.primary())

    def postfix(self, value):
        while True:
            if self.kind() == "range":
                self.take()
            elif self.accept("offset"):
                self.accept("-")
                self.take()
            elif self.accept("@"):
                if self.accept("start", "end"):
                    self.take("(")
                    self.take(")")
                else:
                    self.take()
            else:
                return value

    def primary(self):
        kind, text = self.kind(), self.peek()
        if kind in ("number", "duration"):
            self.take()
            return Value("scalar")
        if kind == "string":
            self.take()
            return Value("string", text=unquote(text))
        if text == "(":
            self.take()
            value = self.expression(0)
            self.take(")")
            return value
        if text == "{":
            return self.selector(None)
        if kind == "ident":
            following = self.peek(1)
            if text in AGGREGATIONS and following in ("(", "by", "without"):
                return self.aggregation()
            if following == "(":
                return self.call()
            if text.lower() in ("inf", "nan"):
                self.take()
                return Value("scalar")
            self.take()
            return self.selector(text)
        raise SyntaxError(f"unexpected {text!r}")

    def selector(self, name):
        matchers = []
        if self.accept("{"):
            while self.peek() != "}":
                label = self.take()
                operator = self.take()
                matchers.append((label, operator, unquote(self.take())))
                self.accept(",")
            self.take("}")
        if name is None:
            name = next((v for l, o, v in matchers if l == "__name__" and o == "="), None)
            if name is None:
                self.context.report.fail(self.where, "a selector without a metric name")
                return Value("vector")
        return self.context.selector(self.where, name, matchers)

    def aggregation(self):
        operator = self.take()
        clause = None
        if self.peek() in ("by", "without"):
            clause = (self.take(), self.label_list())
        self.take("(")
        parameter = None
        if operator in AGGREGATIONS_WITH_PARAMETER:
            parameter = self.expression(0)
            self.take(",")
        argument = self.expression(0)
        self.take(")")
        if clause is None and self.peek() in ("by", "without"):
            clause = (self.take(), self.label_list())
        return self.context.aggregate(self.where, operator, clause, parameter, argument)

    def call(self):
        name = self.take()
        self.take("(")
        arguments = []
        while self.peek() != ")":
            arguments.append(self.expression(0))
            self.accept(",")
        self.take(")")
        return self.context.function(self.where, name, arguments)


def unquote(text):
    """The value of a PromQL string literal: quoted with ", ' (escapes as in Go) or ` (raw)."""
    if text[0] == "`":
        return text[1:-1]
    return json.loads('"' + text[1:-1].replace('\\"', '"').replace('"', '\\"') + '"')


class Checker:
    """The label semantics of PromQL, checked against one scrape."""

    def __init__(self, scrape, target_labels, jobs, report):
        self.scrape, self.target_labels, self.jobs = scrape, target_labels, jobs
        self.report = report
        self.used = set()

    def expression(self, where, expr):
        try:
            return Analysis(expr, where, self).run()
        except SyntaxError as e:
            self.report.fail(where, f"cannot analyse the expression ({e}): {expr}")
            return Value("vector")

    def labels_of(self, name, where):
        if name in SCRAPE_SERIES:
            return set(self.target_labels)
        if name not in self.scrape.labels:
            self.report.missing_metric(name, where)
            return None
        self.used.add(self.scrape.family(name))
        return set(self.scrape.labels[name]) | self.target_labels

    def selector(self, where, name, matchers):
        labels = self.labels_of(name, where)
        equal = set()
        for label, operator, value in matchers:
            if label == "__name__":
                continue
            if operator == "=":
                equal.add(label)
            if labels is not None and label not in labels:
                self.report.fail(where, f"{name} has no label {label!r}")
            elif label == "job" and operator == "=" and value not in self.jobs:
                self.report.fail(where, f'job="{value}" is no job of the scrape configuration')
            elif labels is not None and label not in self.target_labels and operator in ("=", "=~"):
                seen = self.scrape.labels[name].get(label, set())
                wanted = [value] if operator == "=" else (
                    value.split("|") if re.fullmatch(r"[\w.-]+(\|[\w.-]+)*", value) else [])
                unseen = [v for v in wanted if v not in seen]
                if unseen:
                    self.report.note(
                        where, f"{name}{{{label}}} took no value {', '.join(unseen)} in this run")
        return Value("vector", labels, equal=equal)

    def aggregate(self, where, operator, clause, parameter, argument):
        if argument.kind != "vector":
            self.report.fail(where, f"{operator} over a {argument.kind}")
            return Value("vector")
        word, names = clause or ("by", [])
        if argument.labels is not None:
            for label in names:
                if label not in argument.labels:
                    self.report.fail(
                        where, f"{operator} {word} ({label}): the series have no {label!r}")
        if operator in SELECTING_AGGREGATIONS or argument.labels is None:
            labels = argument.labels
        elif word == "by":
            labels = set(names)
        else:
            labels = argument.labels - set(names)
        if operator == "count_values" and labels is not None and parameter and parameter.text:
            labels = labels | {parameter.text}
        return Value("vector", labels)

    def function(self, where, name, arguments):
        if name not in FUNCTIONS:
            self.report.fail(where, f"unknown function {name}")
            return Value("vector")
        vectors = [a for a in arguments if a.kind == "vector"]
        if name in ("time", "pi", "scalar"):
            return Value("scalar")
        if name == "vector":
            return Value("vector", set())
        if name in ("absent", "absent_over_time"):
            return Value("vector", vectors[0].equal if vectors else set())
        if not vectors:
            return Value("scalar")
        labels = vectors[0].labels
        if labels is None:
            return Value("vector")
        if name == "histogram_quantile":
            if "le" not in labels:
                self.report.fail(
                    where, "histogram_quantile over series without 'le' (keep le when aggregating)")
            return Value("vector", labels - {"le"})
        if name in ("label_replace", "label_join"):
            strings = [a.text for a in arguments if a.kind == "string"]
            target, sources = strings[0], (strings[2:3] if name == "label_replace" else strings[2:])
            for source in sources:
                if source and source not in labels:
                    self.report.fail(where, f"{name} reads label {source!r}, which the series lack")
            return Value("vector", labels | {target})
        return Value("vector", labels)

    def binary(self, where, operator, left, right, matching, grouping):
        if left.kind != "vector" or right.kind != "vector":
            vector = next((v for v in (left, right) if v.kind == "vector"), None)
            return vector or Value("scalar")
        if left.labels is None or right.labels is None:
            return Value("vector")
        if matching:
            word, names = matching
            if word == "on":
                for label in names:
                    for side, labels in (("left", left.labels), ("right", right.labels)):
                        if label not in labels:
                            self.report.fail(
                                where, f"on ({label}): the {side} side has no {label!r}")
        if operator in SET_OPERATORS:
            return Value("vector", left.labels | right.labels if operator == "or" else left.labels)
        if grouping:
            side, extra = grouping
            one = right.labels if side == "group_left" else left.labels
            for label in extra:
                if label not in one:
                    self.report.fail(where, f"{side} ({label}): the one side has no {label!r}")
            many = left.labels if side == "group_left" else right.labels
            return Value("vector", many | set(extra))
        if not matching or matching[0] == "ignoring":
            ignored = set(matching[1]) if matching else set()
            if left.labels - ignored != right.labels - ignored:
                self.report.fail(
                    where, f"the sides of {operator} carry different labels ({sorted(left.labels)} "
                    f"and {sorted(right.labels)}): no series would match")
        return Value("vector", left.labels)

    def templates(self, where, text, value):
        """Labels a legend ({{agent}}) or an alert template ({{ $labels.agent }}) names must be
        on the expression's result."""
        if value.labels is None:
            return
        names = re.findall(r"\{\{\s*(\w+)\s*\}\}", text) + re.findall(r"\$labels\.(\w+)", text)
        for label in names:
            if label not in value.labels:
                self.report.fail(
                    where, f"names label {label!r}, not on the result ({sorted(value.labels)})")


def target_labels():
    """Labels the scrape configuration adds to every series, and its job names."""
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    labels, jobs = set(PROMETHEUS_TARGET_LABELS), set()
    for job in config["scrape_configs"]:
        jobs.add(job["job_name"])
        for rule in job.get("relabel_configs", []):
            target = rule.get("target_label", "")
            if rule.get("action", "replace") == "replace" and not target.startswith("__"):
                labels.add(target)
    return labels, jobs


# The broker and its workload.

def start_broker(binary):
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER__")}
    env["BROKER__LOG__FORMAT"] = "json"
    if "{internal_listen}" in METRICS_URL:
        env["BROKER__INTERNAL_LISTEN"] = "127.0.0.1:0"
    process = subprocess.Popen(
        [binary, "serve", "--demo", "--listen", "127.0.0.1:0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    ready, log = threading.Event(), []
    fields = {}

    def read():
        for line in process.stdout:
            log.append(line)
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("message") == "session broker ready":
                fields.update(entry)
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(START_TIMEOUT) or not fields:
        process.kill()
        sys.exit("the broker did not start:\n" + "".join(log[-20:]))
    return process, fields


def http(method, url, body=None, key=DEMO_KEY):
    request = urllib.request.Request(url, method=method, data=body)
    request.add_header("Authorization", f"Bearer {key}")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


async def refused_connect(url):
    """The HTTP status of a WebSocket connect the broker refuses before the upgrade."""
    try:
        async with websockets.connect(url, open_timeout=5):
            return 101
    except websockets.exceptions.InvalidStatus as e:
        return e.response.status_code


async def workload(base):
    """One session of each kind an operator watches: started, connected and echoed, replayed,
    forged, for a missing agent, with a wrong key."""
    start = f"{base}/v1/public/{DEMO_AGENT}/start"
    status, body = http("POST", start, b'{"transport": "websocket"}')
    assert status == 200, (status, body)
    started = json.loads(body)
    url = f"{started['wsUrl']}/{started['token']}"
    async with websockets.connect(url, open_timeout=5) as ws:
        await ws.send("hello")
        assert await asyncio.wait_for(ws.recv(), 5) == "hello"
    assert await refused_connect(url) == 403, "a replayed token is not refused"
    payload, signature = started["token"].split(".")
    forged = payload + "." + ("A" if signature[0] != "A" else "B") + signature[1:]
    status = await refused_connect(f"{started['wsUrl']}/{forged}")
    assert status == 403, f"a forged token answers {status}"
    status, _ = http("POST", f"{base}/v1/public/no-such-agent/start", b"{}")
    assert status == 404, f"a missing agent answers {status}"
    status, _ = http("POST", start, b"{}", key="pk_wrong")
    assert status == 401, f"a wrong key answers {status}"


def scrape(url):
    """The metrics once the session's end is counted: the relay ends after the client closed."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        if "broker_sessions_ended_total{" in text or time.monotonic() > deadline:
            return text
        time.sleep(0.1)


# The checks.

def promtool(report, where, *arguments, stdin=None):
    result = subprocess.run(["promtool", *arguments], input=stdin, capture_output=True, text=True)
    if result.returncode != 0:
        report.fail(where, (result.stdout + result.stderr).strip())


def check_syntax(report, expressions):
    """Every expression through Prometheus's own parser, as recording rules."""
    rules = [{"record": f"check:expression_{i}", "expr": expr}
             for i, (_, expr) in enumerate(expressions)]
    with tempfile.NamedTemporaryFile("w", suffix=".yml") as file:
        yaml.safe_dump({"groups": [{"name": "expressions", "rules": rules}]}, file)
        file.flush()
        result = subprocess.run(
            ["promtool", "check", "rules", file.name], capture_output=True, text=True)
    if result.returncode == 0:
        return
    output = result.stdout + result.stderr
    errors = re.findall(r'"check:expression_(\d+)": (.*)', output)
    for index, error in errors:
        where, expr = expressions[int(index)]
        report.fail(where, f"promtool: {error}: {expr}")
    if not errors:
        report.fail("promtool check rules (the expressions)", output.strip())


def grafana_expression(report, where, expr):
    """The query as Prometheus receives it from Grafana."""
    def substitute(match):
        name = match.group(1) or match.group(2)
        if name.isdigit():
            return match.group()  # a regex group in label_replace, not a variable
        if name not in GRAFANA_VARIABLES:
            report.fail(where, f"unknown Grafana variable ${name}")
            return match.group()
        return GRAFANA_VARIABLES[name]
    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", substitute, expr)


def panels(dashboard):
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def check_dashboard(report, checker, expressions):
    where = DASHBOARD.relative_to(ROOT)
    dashboard = json.loads(DASHBOARD.read_text())
    if dashboard.get("schemaVersion", 0) < 38:
        report.fail(where, f"schemaVersion {dashboard.get('schemaVersion')} below 38")
    inputs = [i for i in dashboard.get("__inputs", [])
              if i.get("type") == "datasource" and i.get("pluginId") == "prometheus"]
    if not inputs:
        report.fail(where, "no Prometheus data source in __inputs: Import would not ask for one")
    for entry in inputs:
        if "${" + entry["name"] + "}" not in DASHBOARD.read_text():
            report.fail(where, f"input {entry['name']} is used nowhere")
    variables = {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}
    source = variables.get("datasource", {})
    if source.get("type") != "datasource" or source.get("query") != "prometheus":
        report.fail(where, "no Prometheus data source variable named datasource")
    for name in ("region", "instance"):
        variable = variables.get(name)
        if not variable or variable.get("type") != "query":
            report.fail(where, f"no query variable {name}")
            continue
        if variable.get("datasource", {}).get("uid") != "${datasource}":
            report.fail(where, f"variable {name} is not on ${{datasource}}")
        query = variable["query"]
        query = query["query"] if isinstance(query, dict) else query
        match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query.strip())
        if not match:
            report.fail(
                where, f"variable {name}: expected label_values(selector, label), found {query}")
            continue
        here = f"variable {name}"
        expr = grafana_expression(report, here, match.group(1))
        expressions.append((here, expr))
        value = checker.expression(here, expr)
        if value.labels is not None and match.group(2) not in value.labels:
            report.fail(here, f"label {match.group(2)!r} is not on {match.group(1)}")
    ids = set()
    count = 0
    for panel in panels(dashboard):
        here = f"panel {panel.get('title')!r}"
        if panel.get("id") in ids:
            report.fail(here, f"id {panel.get('id')} used twice")
        ids.add(panel.get("id"))
        if "gridPos" not in panel:
            report.fail(here, "no gridPos")
        # A row only groups the panels below it: it has no query of its own.
        if panel.get("type") == "row":
            continue
        count += 1
        if not panel.get("title"):
            report.fail(here, "no title")
        if panel.get("datasource", {}).get("uid") != "${datasource}":
            report.fail(here, "not on the ${datasource} variable")
        targets = panel.get("targets") or []
        if not targets:
            report.fail(here, "no query")
        for target in targets:
            if target.get("datasource", {}).get("uid", "${datasource}") != "${datasource}":
                report.fail(here, f"query {target.get('refId')} on another data source")
            if not target.get("expr"):
                report.fail(here, f"query {target.get('refId')} has no expression")
                continue
            expr = grafana_expression(report, here, target["expr"])
            expressions.append((here, expr))
            value = checker.expression(here, expr)
            checker.templates(f"{here} legend", target.get("legendFormat", ""), value)
    return count


def heading_anchors(markdown):
    """GitHub's anchors for the headings of a Markdown file."""
    anchors = set()
    for heading in re.findall(r"^#+\s+(.+?)\s*$", markdown, re.MULTILINE):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"))
    return anchors


def check_alerts(report, checker, expressions):
    where = ALERTS.relative_to(ROOT)
    anchors = heading_anchors(RUNBOOKS.read_text()) if RUNBOOKS.exists() else set()
    if not anchors:
        report.fail(RUNBOOKS.relative_to(ROOT), "missing or without headings")
    tests = yaml.safe_load(ALERT_TESTS.read_text())
    fired, silent = set(), set()
    for test in tests["tests"]:
        for case in test.get("alert_rule_test", []):
            (fired if case.get("exp_alerts") else silent).add(case["alertname"])
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    alerts = [rule for group in groups for rule in group["rules"] if "alert" in rule]
    for rule in alerts:
        here = f"alert {rule['alert']}"
        if rule.get("labels", {}).get("severity") not in ("critical", "warning", "info"):
            report.fail(here, "no severity label (critical, warning or info)")
        annotations = rule.get("annotations", {})
        for name in ("summary", "description", "runbook_url"):
            if not annotations.get(name):
                report.fail(here, f"no {name} annotation")
        url = annotations.get("runbook_url", "")
        prefix = f"{RUNBOOKS.relative_to(ROOT)}#"
        if not url.startswith(prefix) or url[len(prefix):] not in anchors:
            report.fail(here, f"runbook_url {url!r} is no heading of {RUNBOOKS.relative_to(ROOT)}")
        if rule["alert"] not in fired or rule["alert"] not in silent:
            report.fail(here, f"{ALERT_TESTS.relative_to(ROOT)} must show it firing and not firing")
        expressions.append((here, rule["expr"]))
        value = checker.expression(here, rule["expr"])
        for text in [*annotations.values(), *rule.get("labels", {}).values()]:
            checker.templates(here, text, value)
    return len(alerts)


def check_runbooks(report, checker, expressions):
    """Links between runbooks resolve, and their PromQL (```promql blocks, one expression a
    line) reads real series."""
    where = RUNBOOKS.relative_to(ROOT)
    if not RUNBOOKS.exists():
        return
    markdown = RUNBOOKS.read_text()
    anchors = heading_anchors(markdown)
    for anchor in re.findall(r"\]\(#([^)]+)\)", markdown):
        if anchor not in anchors:
            report.fail(where, f"link to #{anchor}, which is no heading")
    for block in re.findall(r"```promql\n(.*?)```", markdown, re.DOTALL):
        for expr in filter(None, map(str.strip, block.splitlines())):
            expressions.append((f"{where} query", expr))
            checker.expression(f"{where} query", expr)


def main():
    binary = sys.argv[1]
    report = Report()
    labels, jobs = target_labels()
    process, fields = start_broker(binary)
    try:
        base = f"http://{fields['listen']}"
        asyncio.run(workload(base))
        text = scrape(METRICS_URL.format(**fields))
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
    metrics = Scrape(text)
    print(f"broker {binary} on {fields['listen']}: workload done, "
          f"{len(metrics.types)} metric families in the scrape")

    promtool(report, "promtool check metrics", "check", "metrics", stdin=text)
    promtool(report, "promtool check rules", "check", "rules", str(ALERTS))
    promtool(report, "promtool test rules", "test", "rules", str(ALERT_TESTS))
    for name, series in metrics.labels.items():
        for label in sorted(set(series) & labels):
            report.fail(name, f"the broker exports label {label!r}, which the scrape configuration "
                        f"sets as a target label (Prometheus would rename it exported_{label})")

    checker = Checker(metrics, labels, jobs, report)
    expressions = []
    panel_count = check_dashboard(report, checker, expressions)
    alert_count = check_alerts(report, checker, expressions)
    check_runbooks(report, checker, expressions)
    check_syntax(report, expressions)
    print(f"checked {panel_count} panels and {alert_count} alerts: {len(expressions)} expressions; "
          f"target labels {sorted(labels)}, jobs {sorted(jobs)}")
    for family in sorted(metrics.types):
        if family.startswith("broker_") and family not in checker.used:
            report.note(family, "exported, but on no panel and in no alert")

    for name, users in sorted(report.missing.items()):
        suffixes = ("_bucket", "_sum", "_count")
        family = next((name.removesuffix(s) for s in suffixes if name.endswith(s)), name)
        shown = f"{family} (a histogram: {name})" if family != name else name
        report.fail(f"missing metric {shown}", "used by " + ", ".join(sorted(set(users))))
    for line in dict.fromkeys(report.notes):
        print(f"note  {line}")
    for line in report.failures:
        print(f"FAIL  {line}")
    if report.failures:
        print(f"observability check: {len(report.failures)} failures, "
              f"{len(report.missing)} of them metrics the broker does not export")
        sys.exit(1)
    print("observability check passed")


if __name__ == "__main__":
    main()
