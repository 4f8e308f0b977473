"""Small data-analysis tasks over real files (CSV, XLSX, SQLite), in the RL parquet schema of
DataScience-Instruct-500K, for ``env=code_sandbox``: the tests and the default agentic run use them offline.

    rows = analysis_tasks(n=64, split="train", seed=0, workspace_root="outputs/.cache/analysis_tasks")

Each task writes its files into ``<workspace_root>/files/<workspace_id>/`` (written once: a folder that exists is
left as it is, and a new one appears atomically by rename, so ranks and reruns can share the root) and gives a row:

=================  ====================================================================================
``prompt``         ``[{"role": "user", "content": ...}]``, DeepAnalyze's layout: ``# Instruction\\n<task>\\n\\n# Data
                   \\nFile 1:\\n{"name": "sales.csv", "size": "0.4KB"}`` (names and sizes only: the policy must open
                   the files itself; the working directory is the workspace)
``data_source``    ``qa`` | ``datatask`` | ``research``
``input_seq``      the instruction text (what the judge is shown)
``workspace_id``   the task's folder name (a hash of the task)
``data``           ``files``: the sub-folder of the workspace root, as in the real RL data
``reward_spec``    ``{"method": qa|datatask|openresearch, "ground_truth": str, "function": [judge names],
                   "response": a worked trajectory}``
``env_class``      ``deepanalyze``
``workspace_root`` the root the files were written under (the env reads it; ``env.workspace_root`` otherwise)
``answer``         the gold answer (qa: the ground truth; datatask: the reported top row; research: None),
                   which ``reward=deepanalyze`` scores
=================  ====================================================================================

Other forms (``form=``), in the layout of DataScience-Instruct's SFT files (ms-swift ``messages``; ``adapter:
deepanalyze`` reads them): ``trajectory``, the multi-turn cold start, one assistant message whose Execute span is
what the worked code really printed in `stagewise.envs.sandbox.Sandbox`, formatted by the env's own
`format_observation` (so SFT data and RL context are byte-identical; ``direct_fraction`` of the qa rows answer at
once with a shortcut instead); ``single``, single-ability rows (qa only) with the file's content inline in the
prompt and an Analyze + Answer reply, no code.

Tasks (``mix`` sets the share of each method; the file kind is drawn uniformly from ``file_kinds``):
  * qa, with an exact answer computed here in integers (money in cents, so no float ties): ``sales.csv``
    (top-revenue region, units of a product, orders above a size, average price of a product to 2 decimals),
    ``employees.xlsx`` (top-paid department on average, headcount, best-paid person, payroll of the seniors),
    ``shop.db`` (orders with a status, customers with an order of a status (a count across both tables), best
    customer by total, shipped total of a city to 2 decimals), ``trials.csv`` (recovery counts of two treatments by
    severity, built so that Simpson's paradox holds: which treatment recovers more patients overall, and within one
    severity; the answers differ, and each question's shortcut is the other's answer). Questions
    whose answer would be a tie, or whose rounding would sit on a .5 boundary, are never asked.
  * datatask: write a summary table to a named CSV file and report its top row; ground truth = the expected file.
  * research: a short report on the file; ground truth = a data summary (DeepAnalyze's "data thumbnail").
The ``response`` of a task is a full correct trajectory (Analyze, fenced Code, the Execute span of its real
sandbox output, Understand, ``Answer:\n<value>``); outputs are cached next to the workspaces (`run_solutions`).
The value follows a newline wherever it is repeated, as it does in the Execute span: a byte-level BPE gives
``17`` after a newline and ``Ġ17`` after a space, two different tokens, so ``is 17`` would ask a small model to
learn a token-to-token mapping for every number instead of copying the printed one.

Split: a task's key (method, file kind, question, table) is hashed to train or test (`task_split`), so the splits
never overlap. Deterministic in (n, split, seed, kwargs).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import random
import shutil
import sqlite3
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from stagewise.data.generators.common import check_split, rng_for, task_split

REGIONS = ("North", "South", "East", "West")
PRODUCTS = ("Widget", "Gadget", "Gizmo", "Doohickey")
DEPARTMENTS = ("Sales", "Engineering", "Support", "Finance")
NAMES = ("Alice", "Bob", "Carla", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemal", "Lena",
         "Marco", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wen", "Yusuf")
CITIES = ("Paris", "Lima", "Oslo", "Cairo", "Tokyo")
STATUSES = ("shipped", "pending", "cancelled")
FILE_KINDS = ("csv", "xlsx", "sqlite", "trials")  # trials: a second CSV, built to show Simpson's paradox
SEVERITIES = ("mild", "severe")
METHOD_OF = {"qa": "qa", "datatask": "datatask", "research": "openresearch"}
JUDGE_OF = {"qa": "llm_as_judgement_analyze", "datatask": "llm_as_judgement_accuracy",
            "research": "llm_as_judgement_opendomain"}
ANSWER_HINT = "Give the final answer inside <Answer></Answer> as `Answer: <value>`."
DATA_SUBDIR = "files"
_FIXED_TIME = dt.datetime(2024, 1, 1)


@dataclass
class Task:
    """One task before it becomes a row: its files, instruction, ground truth and a worked solution."""

    key: str
    source: str  # qa | datatask | research
    files: Dict[str, Callable[[Path], None]]  # file name -> writer(path)
    instruction: str
    ground_truth: str
    code: str  # the worked solution's code; for qa it prints exactly the ground truth
    expected_output: str  # what that code prints
    plan: str
    conclusion: str
    answer_text: str
    extra_files: List[str] = field(default_factory=list)  # files the solution writes (datatask)
    shortcut: str = ""  # qa: an answer read off the first row / the whole table, without the computation
    tables: str = ""  # the files' content as text (single-ability rows give it inline)


# ============================================================================================ tables
def _money(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


def _sales(rng: random.Random) -> List[dict]:
    return [{"order_id": i + 1, "region": rng.choice(REGIONS), "product": rng.choice(PRODUCTS),
             "units": rng.randint(1, 40), "price_cents": rng.randint(150, 9999)} for i in range(rng.randint(8, 16))]


def _employees(rng: random.Random) -> List[dict]:
    names = rng.sample(NAMES, rng.randint(8, 14))
    return [{"name": nm, "department": rng.choice(DEPARTMENTS), "salary": rng.randint(60, 300) * 500,
             "years": rng.randint(0, 30)} for nm in names]


def _shop(rng: random.Random) -> tuple:
    names = rng.sample(NAMES, rng.randint(4, 7))
    customers = [{"id": i + 1, "name": nm, "city": rng.choice(CITIES)} for i, nm in enumerate(names)]
    orders = [{"id": i + 1, "customer_id": rng.randint(1, len(customers)), "amount_cents": rng.randint(500, 50000),
               "status": rng.choice(STATUSES)} for i in range(rng.randint(10, 20))]
    return customers, orders


def _trials(rng: random.Random) -> Optional[List[dict]]:
    """Recovery counts of two treatments in mild and severe cases, built so that Simpson's paradox holds: the
    treatment that is better within *each* severity is worse overall, because it was mostly given to severe cases
    (the kidney-stone pattern). Rows: treatment, severity, patients, recovered. None when the drawn counts miss the
    paradox by less than a clear margin (the caller draws again)."""
    better, worse = rng.sample(["A", "B"], 2)
    mild_rate, severe_rate = rng.uniform(0.75, 0.9), rng.uniform(0.3, 0.55)
    gap = rng.uniform(0.05, 0.1)  # how much better `better` is within each severity
    plan = {(better, "mild"): (rng.randint(20, 60), mild_rate + gap),
            (better, "severe"): (rng.randint(180, 300), severe_rate + gap),
            (worse, "mild"): (rng.randint(180, 300), mild_rate),
            (worse, "severe"): (rng.randint(20, 60), severe_rate)}
    rows = [{"treatment": t, "severity": sev, "patients": n, "recovered": min(n, round(n * rate))}
            for (t, sev), (n, rate) in sorted(plan.items())]
    rate = {(r["treatment"], r["severity"]): r["recovered"] / r["patients"] for r in rows}
    overall = {t: sum(r["recovered"] for r in rows if r["treatment"] == t) /
               sum(r["patients"] for r in rows if r["treatment"] == t) for t in (better, worse)}
    within = all(rate[(better, sev)] - rate[(worse, sev)] > 0.02 for sev in SEVERITIES)
    return rows if within and overall[worse] - overall[better] > 0.02 else None


def _table_hash(obj: Any) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True).encode(), digest_size=6).hexdigest()


# ------------------------------------------------------------------------------------------ writers
def _write_sales(rows: List[dict]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        lines = ["order_id,region,product,units,price"]
        lines += [f"{r['order_id']},{r['region']},{r['product']},{r['units']},{_money(r['price_cents'])}" for r in rows]
        path.write_text("\n".join(lines) + "\n")
    return write


def _trials_csv(rows: List[dict]) -> str:
    return "treatment,severity,patients,recovered\n" + "\n".join(
        f"{r['treatment']},{r['severity']},{r['patients']},{r['recovered']}" for r in rows) + "\n"


def _write_trials(rows: List[dict]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        path.write_text(_trials_csv(rows))
    return write


def _write_employees(rows: List[dict]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        from openpyxl import Workbook

        wb = Workbook()
        ws = wb.active
        ws.title = "staff"
        ws.append(["name", "department", "salary", "years"])
        for r in rows:
            ws.append([r["name"], r["department"], r["salary"], r["years"]])
        wb.properties.created = wb.properties.modified = _FIXED_TIME
        wb.save(path)
        _pin_xlsx_times(path)
    return write


def _pin_xlsx_times(path: Path) -> None:
    """openpyxl stamps the save time into ``docProps/core.xml`` and every zip entry, so the same table gave files
    whose (compressed) size differed by a byte or two from run to run, and a size shown in the prompt could flip
    between 5.1KB and 5.2KB. Rewrite both with the fixed time: the same table is the same bytes."""
    import re
    import zipfile

    fixed = _FIXED_TIME.strftime("%Y-%m-%dT%H:%M:%SZ")
    with zipfile.ZipFile(path) as src:
        entries = [(info, src.read(info)) for info in src.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for info, data in entries:
            if info.filename == "docProps/core.xml":
                data = re.sub(rb"(<dcterms:modified[^>]*>)[^<]*", rb"\g<1>" + fixed.encode(), data)
            pinned = zipfile.ZipInfo(info.filename, date_time=_FIXED_TIME.timetuple()[:6])
            pinned.compress_type = zipfile.ZIP_DEFLATED
            dst.writestr(pinned, data)


def _write_shop(customers: List[dict], orders: List[dict]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        con = sqlite3.connect(path)
        try:
            con.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, city TEXT)")
            con.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER REFERENCES customers(id), "
                        "amount REAL, status TEXT)")
            con.executemany("INSERT INTO customers VALUES (?, ?, ?)", [(c["id"], c["name"], c["city"])
                                                                       for c in customers])
            con.executemany("INSERT INTO orders VALUES (?, ?, ?, ?)",
                            [(o["id"], o["customer_id"], o["amount_cents"] / 100, o["status"]) for o in orders])
            con.commit()
        finally:
            con.close()
    return write


# ============================================================================================ questions
def _unique_top(totals: Dict[str, float], margin: float) -> Optional[str]:
    """The key with the largest value if it beats the runner-up by ``margin``, else None (a near tie)."""
    ranked = sorted(totals.items(), key=lambda kv: kv[1], reverse=True)
    if not ranked or (len(ranked) > 1 and ranked[0][1] - ranked[1][1] < margin):
        return None
    return ranked[0][0]


def _safe_round(numerator: int, denominator: int) -> Optional[str]:
    """``numerator / denominator`` cents as dollars with 2 decimals, or None when the cents are too close to .5."""
    cents = numerator / denominator
    if abs(cents - int(cents) - 0.5) < 1e-3:
        return None
    return _money(int(round(cents)))


def _sales_qa(rng: random.Random, rows: List[dict]) -> Optional[tuple]:
    head = "import pandas as pd\ndf = pd.read_csv('sales.csv')\n"
    kind = rng.choice(["top_region", "units_of", "orders_over", "avg_price"])
    if kind == "top_region":
        rev: Dict[str, float] = {}
        for r in rows:
            rev[r["region"]] = rev.get(r["region"], 0) + r["units"] * r["price_cents"]
        top = _unique_top(rev, margin=100)
        if top is None:
            return None
        return (kind, "Which region has the highest total revenue (units times price) in sales.csv?", top,
                head + "df['revenue'] = df['units'] * df['price']\n"
                       "print(df.groupby('region')['revenue'].sum().idxmax())", rows[0]["region"])
    if kind == "units_of":
        product = rng.choice(sorted({r["product"] for r in rows}))
        total = sum(r["units"] for r in rows if r["product"] == product)
        return (f"{kind}:{product}", f"How many units of {product} were sold in total in sales.csv?", str(total),
                head + f"print(int(df.loc[df['product'] == '{product}', 'units'].sum()))",
                str(next(r["units"] for r in rows if r["product"] == product)))
    if kind == "orders_over":
        k = rng.randint(5, 35)
        count = sum(r["units"] > k for r in rows)
        return (f"{kind}:{k}", f"How many orders in sales.csv have more than {k} units?", str(count),
                head + f"print(int((df['units'] > {k}).sum()))", str(len(rows)))
    product = rng.choice(sorted({r["product"] for r in rows}))
    prices = [r["price_cents"] for r in rows if r["product"] == product]
    avg = _safe_round(sum(prices), len(prices))
    if avg is None:
        return None
    return (f"{kind}:{product}", f"What is the average price of {product} orders in sales.csv, rounded to 2 decimal "
            "places?", avg, head + f"print(f\"{{df.loc[df['product'] == '{product}', 'price'].mean():.2f}}\")",
            _money(prices[0]))


def _employees_qa(rng: random.Random, rows: List[dict]) -> Optional[tuple]:
    head = "import pandas as pd\ndf = pd.read_excel('employees.xlsx', sheet_name='staff')\n"
    kind = rng.choice(["top_department", "headcount", "top_earner", "senior_payroll"])
    if kind == "top_department":
        sums: Dict[str, List[int]] = {}
        for r in rows:
            sums.setdefault(r["department"], []).append(r["salary"])
        top = _unique_top({d: sum(v) / len(v) for d, v in sums.items()}, margin=1.0)
        if top is None:
            return None
        return (kind, "Which department in employees.xlsx has the highest average salary?", top,
                head + "print(df.groupby('department')['salary'].mean().idxmax())", rows[0]["department"])
    if kind == "headcount":
        dept = rng.choice(DEPARTMENTS)
        count = sum(r["department"] == dept for r in rows)
        return (f"{kind}:{dept}", f"How many employees in employees.xlsx work in the {dept} department?", str(count),
                head + f"print(int((df['department'] == '{dept}').sum()))", str(len(rows)))
    if kind == "top_earner":
        top = _unique_top({r["name"]: r["salary"] for r in rows}, margin=1)
        if top is None:
            return None
        return (kind, "Who has the highest salary in employees.xlsx?", top,
                head + "print(df.loc[df['salary'].idxmax(), 'name'])", rows[0]["name"])
    y = rng.randint(3, 25)
    total = sum(r["salary"] for r in rows if r["years"] > y)
    return (f"{kind}:{y}", f"What is the total salary of the employees in employees.xlsx with more than {y} years "
            "of service?", str(total), head + f"print(int(df.loc[df['years'] > {y}, 'salary'].sum()))",
            str(sum(r["salary"] for r in rows)))


def _trials_qa(rng: random.Random, rows: List[dict]) -> tuple:
    """Simpson's paradox: the overall winner and the winner within a severity differ, and each question's
    shortcut is the other one (the aggregate read as if it held within groups, or the reverse)."""
    def best(selected: List[dict]) -> str:
        rate = {t: sum(r["recovered"] for r in selected if r["treatment"] == t) /
                sum(r["patients"] for r in selected if r["treatment"] == t) for t in ("A", "B")}
        return max(rate, key=rate.get)

    head = "import pandas as pd\ndf = pd.read_csv('trials.csv')\n"
    overall = best(rows)
    within = best([r for r in rows if r["severity"] == "mild"])
    kind = rng.choice(["overall_best", "severity_best"])
    if kind == "overall_best":
        return (kind, "Which treatment in trials.csv has the higher overall recovery rate (recovered patients over "
                "all its patients)?", overall,
                head + "totals = df.groupby('treatment')[['recovered', 'patients']].sum()\n"
                       "print((totals['recovered'] / totals['patients']).idxmax())", within)
    severity = rng.choice(SEVERITIES)
    return (f"{kind}:{severity}", f"Among the {severity} cases in trials.csv, which treatment has the higher "
            "recovery rate?", within,
            head + f"part = df[df['severity'] == '{severity}'].set_index('treatment')\n"
                   "print((part['recovered'] / part['patients']).idxmax())", overall)


def _shop_qa(rng: random.Random, customers: List[dict], orders: List[dict]) -> Optional[tuple]:
    head = "import sqlite3\ncon = sqlite3.connect('shop.db')\n"
    kind = rng.choice(["status_count", "best_customer", "city_shipped", "customers_with_status"])
    if kind == "status_count":
        status = rng.choice(STATUSES)
        count = sum(o["status"] == status for o in orders)
        return (f"{kind}:{status}", f"How many orders in shop.db have the status '{status}'?", str(count),
                head + f"print(con.execute(\"SELECT COUNT(*) FROM orders WHERE status = '{status}'\").fetchone()[0])",
                str(len(orders)))
    if kind == "customers_with_status":  # a count across both tables: distinct customers, not orders
        status = rng.choice(STATUSES)
        count = len({o["customer_id"] for o in orders if o["status"] == status})
        return (f"{kind}:{status}", f"How many customers in shop.db have at least one order with the status "
                f"'{status}'?", str(count),
                head + "print(con.execute(\"SELECT COUNT(DISTINCT c.id) FROM customers c JOIN orders o ON "
                       f"o.customer_id = c.id WHERE o.status = '{status}'\").fetchone()[0])",
                str(sum(o["status"] == status for o in orders)))
    name_of = {c["id"]: c["name"] for c in customers}
    if kind == "best_customer":
        totals: Dict[str, int] = {}
        for o in orders:
            totals[name_of[o["customer_id"]]] = totals.get(name_of[o["customer_id"]], 0) + o["amount_cents"]
        top = _unique_top(totals, margin=1)
        if top is None:
            return None
        return (kind, "Which customer in shop.db has the largest total order amount (all statuses)?", top,
                head + "print(con.execute('SELECT c.name FROM orders o JOIN customers c ON o.customer_id = c.id '\n"
                       "                  'GROUP BY c.id ORDER BY SUM(o.amount) DESC LIMIT 1').fetchone()[0])",
                customers[0]["name"])
    city_of = {c["id"]: c["city"] for c in customers}
    cities = sorted({city_of[o["customer_id"]] for o in orders if o["status"] == "shipped"})
    if not cities:
        return None
    city = rng.choice(cities)
    total = sum(o["amount_cents"] for o in orders if o["status"] == "shipped" and city_of[o["customer_id"]] == city)
    return (f"{kind}:{city}", f"What is the total amount of shipped orders from customers in {city} in shop.db, "
            "rounded to 2 decimal places?", _money(total),
            head + "total = con.execute(\"SELECT SUM(o.amount) FROM orders o JOIN customers c ON o.customer_id = "
                   f"c.id WHERE o.status = 'shipped' AND c.city = '{city}'\").fetchone()[0]\nprint(f\"{{total:.2f}}\")",
            _money(sum(o["amount_cents"] for o in orders if o["status"] == "shipped")))


# ============================================================================================ datatask, research
def _sales_datatask(rows: List[dict]) -> tuple:
    rev: Dict[str, int] = {}
    for r in rows:
        rev[r["region"]] = rev.get(r["region"], 0) + r["units"] * r["price_cents"]
    ranked = sorted(rev.items(), key=lambda kv: (-kv[1], kv[0]))
    table = "region,revenue\n" + "\n".join(f"{k},{_money(v)}" for k, v in ranked)
    code = ("import pandas as pd\ndf = pd.read_csv('sales.csv')\ndf['revenue'] = df['units'] * df['price']\n"
            "out = df.groupby('region', as_index=False)['revenue'].sum().round(2)\n"
            "out = out.sort_values(['revenue', 'region'], ascending=[False, True])\n"
            "out.to_csv('revenue_by_region.csv', index=False, float_format='%.2f')\nprint(out.iloc[0]['region'])")
    return ("revenue_by_region", "Compute the total revenue (units times price) of each region in sales.csv, save it "
            "to revenue_by_region.csv with the columns region and revenue, sorted from the highest revenue to the "
            "lowest, and report the region with the highest revenue.",
            f"revenue_by_region.csv:\n{table}\nTop region: {ranked[0][0]}", code, ranked[0][0], "revenue_by_region.csv")


def _employees_datatask(rows: List[dict]) -> tuple:
    depts: Dict[str, List[int]] = {}
    for r in rows:
        depts.setdefault(r["department"], []).append(r["salary"])
    ranked = sorted(depts.items(), key=lambda kv: kv[0])
    table = "department,headcount\n" + "\n".join(f"{d},{len(v)}" for d, v in ranked)
    biggest = sorted(depts.items(), key=lambda kv: (-len(kv[1]), kv[0]))[0][0]
    code = ("import pandas as pd\ndf = pd.read_excel('employees.xlsx', sheet_name='staff')\n"
            "out = df.groupby('department').size().rename('headcount').reset_index().sort_values('department')\n"
            "out.to_csv('headcount.csv', index=False)\n"
            "print(out.sort_values(['headcount', 'department'], ascending=[False, True]).iloc[0]['department'])")
    return ("headcount", "Count the employees of each department in employees.xlsx, save the counts to "
            "headcount.csv with the columns department and headcount in alphabetical order of department, and "
            "report the department with the most employees.",
            f"headcount.csv:\n{table}\nLargest department: {biggest}", code, biggest, "headcount.csv")


def _shop_datatask(customers: List[dict], orders: List[dict]) -> tuple:
    name_of = {c["id"]: c["name"] for c in customers}
    counts: Dict[str, int] = {}
    for o in orders:
        counts[name_of[o["customer_id"]]] = counts.get(name_of[o["customer_id"]], 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    table = "name,orders\n" + "\n".join(f"{k},{v}" for k, v in ranked)
    code = ("import sqlite3\nimport pandas as pd\ncon = sqlite3.connect('shop.db')\n"
            "out = pd.read_sql('SELECT c.name AS name, COUNT(*) AS orders FROM orders o JOIN customers c '\n"
            "                  'ON o.customer_id = c.id GROUP BY c.id ORDER BY orders DESC, name', con)\n"
            "out.to_csv('orders_per_customer.csv', index=False)\nprint(out.iloc[0]['name'])")
    return ("orders_per_customer", "Count the orders of each customer in shop.db, save the result to "
            "orders_per_customer.csv with the columns name and orders, sorted by the number of orders (most first, "
            "ties by name), and report the customer with the most orders.",
            f"orders_per_customer.csv:\n{table}\nTop customer: {ranked[0][0]}", code, ranked[0][0],
            "orders_per_customer.csv")


def _trials_datatask(rows: List[dict]) -> tuple:
    totals = {t: (sum(r["recovered"] for r in rows if r["treatment"] == t),
                  sum(r["patients"] for r in rows if r["treatment"] == t)) for t in ("A", "B")}
    top = max(totals, key=lambda t: totals[t][0] / totals[t][1])
    table = "treatment,recovered,patients\n" + "\n".join(f"{t},{rec},{n}" for t, (rec, n) in sorted(totals.items()))
    code = ("import pandas as pd\ndf = pd.read_csv('trials.csv')\n"
            "out = df.groupby('treatment', as_index=False)[['recovered', 'patients']].sum().sort_values('treatment')\n"
            "out.to_csv('recovery_by_treatment.csv', index=False)\n"
            "print(out.set_index('treatment').eval('recovered / patients').idxmax())")
    return ("recovery_by_treatment", "Sum the recovered patients and the patients of each treatment in trials.csv "
            "over both severities, save the totals to recovery_by_treatment.csv with the columns treatment, "
            "recovered and patients in alphabetical order of treatment, and report the treatment with the higher "
            "overall recovery rate.",
            f"recovery_by_treatment.csv:\n{table}\nHigher overall recovery rate: {top}", code, top,
            "recovery_by_treatment.csv")


def _tables_text(file_kind: str, table: Any) -> str:
    """The file's content as CSV text (one block per table of a database), for single-ability rows."""
    if file_kind == "csv":
        return "sales.csv:\norder_id,region,product,units,price\n" + "\n".join(
            f"{r['order_id']},{r['region']},{r['product']},{r['units']},{_money(r['price_cents'])}" for r in table)
    if file_kind == "trials":
        return "trials.csv:\n" + _trials_csv(table).rstrip("\n")
    if file_kind == "xlsx":
        return "employees.xlsx (sheet staff):\nname,department,salary,years\n" + "\n".join(
            f"{r['name']},{r['department']},{r['salary']},{r['years']}" for r in table)
    customers, orders = table
    return ("shop.db table customers:\nid,name,city\n" + "\n".join(f"{c['id']},{c['name']},{c['city']}"
                                                                  for c in customers) +
            "\n\nshop.db table orders:\nid,customer_id,amount,status\n" +
            "\n".join(f"{o['id']},{o['customer_id']},{_money(o['amount_cents'])},{o['status']}" for o in orders))


def _thumbnail(file_name: str, columns: Sequence[str], rows: List[List[Any]]) -> str:
    head = "\n".join(",".join(str(x) for x in r) for r in rows[:3])
    return f"{file_name}: {len(rows)} rows; columns: {', '.join(columns)}; first rows:\n{head}"


# ============================================================================================ assembling
def _make_task(rng: random.Random, source: str, file_kind: str) -> Optional[Task]:
    if file_kind == "csv":
        rows = _sales(rng)
        files = {"sales.csv": _write_sales(rows)}
        table, fname = rows, "sales.csv"
        thumb = _thumbnail(fname, ["order_id", "region", "product", "units", "price"],
                           [[r["order_id"], r["region"], r["product"], r["units"], _money(r["price_cents"])]
                            for r in rows])
        qa = lambda: _sales_qa(rng, rows)  # noqa: E731
        datatask = lambda: _sales_datatask(rows)  # noqa: E731
    elif file_kind == "trials":
        rows = _trials(rng)
        if rows is None:
            return None
        files = {"trials.csv": _write_trials(rows)}
        table, fname = rows, "trials.csv"
        thumb = _thumbnail(fname, ["treatment", "severity", "patients", "recovered"],
                           [[r["treatment"], r["severity"], r["patients"], r["recovered"]] for r in rows])
        qa = lambda: _trials_qa(rng, rows)  # noqa: E731
        datatask = lambda: _trials_datatask(rows)  # noqa: E731
    elif file_kind == "xlsx":
        rows = _employees(rng)
        files = {"employees.xlsx": _write_employees(rows)}
        table, fname = rows, "employees.xlsx"
        thumb = _thumbnail(fname + " (sheet staff)", ["name", "department", "salary", "years"],
                           [[r["name"], r["department"], r["salary"], r["years"]] for r in rows])
        qa = lambda: _employees_qa(rng, rows)  # noqa: E731
        datatask = lambda: _employees_datatask(rows)  # noqa: E731
    else:
        customers, orders = _shop(rng)
        files = {"shop.db": _write_shop(customers, orders)}
        table, fname = [customers, orders], "shop.db"
        thumb = (_thumbnail("shop.db table customers", ["id", "name", "city"],
                            [[c["id"], c["name"], c["city"]] for c in customers]) + "\n" +
                 _thumbnail("shop.db table orders", ["id", "customer_id", "amount", "status"],
                            [[o["id"], o["customer_id"], _money(o["amount_cents"]), o["status"]] for o in orders]))
        qa = lambda: _shop_qa(rng, customers, orders)  # noqa: E731
        datatask = lambda: _shop_datatask(customers, orders)  # noqa: E731
    tkey = f"{file_kind}|{_table_hash(table)}"
    tables = _tables_text(file_kind, table)
    if source == "qa":
        made = qa()
        if made is None:
            return None
        qkey, question, answer, code, shortcut = made
        return Task(key=f"qa|{tkey}|{qkey}", source="qa", files=files, instruction=f"{question} {ANSWER_HINT}",
                    ground_truth=answer, code=code, expected_output=answer, shortcut=shortcut, tables=tables,
                    plan=f"I will load {fname} and compute the answer directly from the data.",
                    conclusion=f"The code printed\n{answer}\n", answer_text=f"Answer:\n{answer}")
    if source == "datatask":
        qkey, instruction, truth, code, top, out_file = datatask()
        return Task(key=f"datatask|{tkey}|{qkey}", source="datatask", files=files, instruction=instruction,
                    ground_truth=truth, code=code, expected_output=top,
                    plan=f"I will load {fname}, build the requested table, save it and report what is asked.",
                    conclusion=f"{out_file} is written; the code printed\n{top}\n",
                    answer_text=f"I saved {out_file}. Answer:\n{top}", extra_files=[out_file], tables=tables)
    instruction = (f"Write a short analytical report on {fname}: describe the data, give its key statistics and "
                   "the most notable patterns, and state your conclusions.")
    code = {"csv": "import pandas as pd\ndf = pd.read_csv('sales.csv')\nprint(df.describe())\n"
                   "print(df.groupby('region')['units'].sum())",
            "trials": "import pandas as pd\ndf = pd.read_csv('trials.csv')\nprint(df)\n"
                      "print(df.groupby('treatment')[['recovered', 'patients']].sum())",
            "xlsx": "import pandas as pd\ndf = pd.read_excel('employees.xlsx', sheet_name='staff')\n"
                    "print(df.describe())\nprint(df.groupby('department')['salary'].mean())",
            "sqlite": "import sqlite3\nimport pandas as pd\ncon = sqlite3.connect('shop.db')\n"
                      "print(pd.read_sql('SELECT status, COUNT(*) AS n, SUM(amount) AS total FROM orders "
                      "GROUP BY status', con))"}[file_kind]
    return Task(key=f"research|{tkey}", source="research", files=files, instruction=instruction,
                ground_truth=thumb, code=code, expected_output="",
                plan=f"I will load {fname}, look at summary statistics and group totals, then write the report.",
                conclusion="The statistics above show the spread of the values and the group totals.",
                answer_text=f"# Report on {fname}\n\nThe data was loaded and summarised; see the statistics above.",
                tables=tables)


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 1024:.1f}KB"


def _materialise(task: Task, root: Path, workspace_id: str) -> Dict[str, int]:
    """Write the task's files under root/files/<workspace_id> once (atomic rename); return name -> size."""
    final = root / DATA_SUBDIR / workspace_id
    if not final.is_dir():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{workspace_id}-", dir=final.parent))
        try:
            for name, write in task.files.items():
                write(tmp / name)
            os.chmod(tmp, 0o755)
            try:
                os.rename(tmp, final)
            except OSError:  # another process made it first: same content by construction
                if not final.is_dir():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return {name: (final / name).stat().st_size for name in task.files}


def prompt_text(instruction: str, sizes: Dict[str, int]) -> str:
    """DeepAnalyze's user prompt: the instruction, then one JSON line per file with its name and size."""
    files = "\n\n".join(f"File {i}:\n" + json.dumps({"name": name, "size": _size(size)})
                        for i, (name, size) in enumerate(sizes.items(), start=1))
    return f"# Instruction\n{instruction}\n\n# Data\n{files}"


def worked_response(task: Task, output: Optional[str] = None) -> str:
    """A correct trajectory for the task, in the one-assistant-message layout with inline Execute spans.

    ``output`` is what the code printed when it ran (`run_solution`); the Execute span is then exactly the env's
    observation (`stagewise.envs.code_sandbox.format_observation`), so this text is byte for byte what the agent
    loop builds when a policy writes the same turns. Without it, the expected output plus its newline stands in."""
    from stagewise.envs.code_sandbox import format_observation

    if output is None:
        output = (task.expected_output if task.source != "research" else "(summary statistics)") + "\n"
    return (f"<Analyze>{task.plan}</Analyze>\n<Code>\n```python\n{task.code}\n```\n</Code>"
            f"{format_observation(output)}<Understand>{task.conclusion}</Understand>\n"
            f"<Answer>{task.answer_text}</Answer>")


def direct_response(task: Task) -> str:
    """A trajectory that answers at once, without code, with the task's shortcut (often wrong): warm-up noise that
    only a reward for the right answer can remove."""
    return ("<Analyze>I will answer straight away, without running code.</Analyze>\n"
            f"<Answer>Answer:\n{task.shortcut}</Answer>")


def single_ability_response(task: Task) -> str:
    """A single-ability answer over the table given inline: reasoning, then ``Answer:\n<value>`` (no code)."""
    return ("<Analyze>The table is given above, so I read it directly and compute the answer from its rows."
            f"</Analyze>\n<Answer>{task.answer_text}</Answer>")


def _output_cache(root: Path, workspace_id: str, code: str) -> Path:
    return root / DATA_SUBDIR / f"{workspace_id}.out" / (hashlib.blake2b(code.encode(), digest_size=8).hexdigest()
                                                         + ".txt")


def run_solutions(jobs: Sequence[tuple], root: Path, timeout_s: float = 30.0) -> List[str]:
    """Run each ``(task, workspace_id)``'s code in a `stagewise.envs.sandbox.Sandbox` and return what it printed.

    The blocks run in one sandbox over a copy of their workspaces (each block starts with ``os.chdir`` into its own
    workspace folder; a stateless sandbox forks a fresh process per block, so blocks share nothing but the files),
    because entering a sandbox per task costs an interpreter start. For qa and datatask tasks the printed value
    must be the expected answer (else ValueError: a generator bug). Outputs are kept next to the workspaces
    (``files/<workspace_id>.out/<code hash>.txt``, written atomically): a workspace never changes once written, so
    reruns and later stages read them instead of running the code again."""
    from stagewise.envs.sandbox import Sandbox

    todo = [(i, task, wid) for i, (task, wid) in enumerate(jobs) if not _output_cache(root, wid, task.code).is_file()]
    if todo:
        stage = Path(tempfile.mkdtemp(prefix=".run-", dir=root))
        try:
            for _, _, wid in todo:
                if not (stage / wid).exists():
                    shutil.copytree(root / DATA_SUBDIR / wid, stage / wid)
            with Sandbox(stage, timeout_s=timeout_s) as sandbox:
                for _, task, wid in todo:
                    result = sandbox.run(f"import os\nos.chdir({wid!r})\n{task.code}")
                    if result.error or (task.source != "research" and result.output.strip() != task.expected_output):
                        raise ValueError(f"generator:analysis_tasks: the worked code of {task.key} printed "
                                         f"{result.output!r}, expected {task.expected_output!r}")
                    cache = _output_cache(root, wid, task.code)
                    cache.parent.mkdir(parents=True, exist_ok=True)
                    fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=".tmp-")
                    with os.fdopen(fd, "w", encoding="utf-8") as f:
                        f.write(result.output)
                    os.replace(tmp, cache)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return [_output_cache(root, wid, task.code).read_text(encoding="utf-8") for task, wid in jobs]


FORMS = ("rl", "trajectory", "single")
QA_KINDS = {"csv": ("top_region", "units_of", "orders_over", "avg_price"),  # the qa question kinds per file kind
            "xlsx": ("top_department", "headcount", "top_earner", "senior_payroll"),
            "trials": ("overall_best", "severity_best"),
            "sqlite": ("status_count", "customers_with_status", "best_customer", "city_shipped")}


def question_kind(task_key: str) -> str:
    """A qa task's question kind (``orders_over`` for ``qa|csv|<hash>|orders_over:12``)."""
    return task_key.split("|")[-1].split(":")[0]


def analysis_tasks(n: int, split: str = "train", seed: int = 0, workspace_root: Optional[str] = None,
                   mix: Optional[Dict[str, float]] = None, file_kinds: Sequence[str] = FILE_KINDS,
                   form: str = "rl", direct_fraction: float = 0.0, questions: Optional[Sequence[str]] = None
                   ) -> List[Dict[str, Any]]:
    """``n`` tasks of ``split``; see the module docstring. ``workspace_root`` defaults to
    ``<tmp>/stagewise-analysis-tasks``; ``mix`` to ``{"qa": 0.6, "datatask": 0.3, "research": 0.1}``.
    ``form``: ``rl`` (RL parquet rows), ``trajectory`` (cold-start ``messages`` rows) or ``single`` (single-ability
    ``messages`` rows, qa tasks only); ``direct_fraction``: the share of qa trajectories that answer at once with
    the task's shortcut instead of running code (``trajectory`` only); ``questions``: keep only qa tasks of these
    kinds (`QA_KINDS`; None = all), e.g. the counting questions a tiny model can learn to answer with code."""
    check_split(split, "analysis_tasks")
    if form not in FORMS:
        raise ValueError(f"generator:analysis_tasks: form must be one of {FORMS}, got {form!r}")
    if not 0.0 <= float(direct_fraction) <= 1.0:
        raise ValueError(f"generator:analysis_tasks: direct_fraction must be in [0, 1], got {direct_fraction}")
    if n < 0:
        raise ValueError(f"generator:analysis_tasks: n must be >= 0, got {n}")
    mix = dict(mix or {"qa": 0.6, "datatask": 0.3, "research": 0.1})
    bad = sorted(set(mix) - set(METHOD_OF))
    if bad or not mix or any(float(w) < 0 for w in mix.values()) or sum(float(w) for w in mix.values()) <= 0:
        raise ValueError(f"generator:analysis_tasks: mix must give non-negative weights to qa/datatask/research, "
                         f"got {mix}")
    kinds = list(file_kinds)
    if not kinds or set(kinds) - set(FILE_KINDS):
        raise ValueError(f"generator:analysis_tasks: file_kinds must be a non-empty subset of {FILE_KINDS}, "
                         f"got {kinds}")
    known = {k for ks in QA_KINDS.values() for k in ks}
    wanted = None if questions is None else set(questions)
    if wanted is not None and (not wanted or wanted - known):
        raise ValueError(f"generator:analysis_tasks: questions must be a non-empty subset of {sorted(known)}, "
                         f"got {sorted(wanted)}")
    if wanted is not None and not any(set(QA_KINDS[k]) & wanted for k in kinds):
        raise ValueError(f"generator:analysis_tasks: none of questions {sorted(wanted)} is asked about "
                         f"file_kinds {kinds}")
    root = Path(workspace_root if workspace_root else Path(tempfile.gettempdir()) / "stagewise-analysis-tasks")
    root = root.expanduser().resolve()
    rng = rng_for("analysis_tasks", split, seed)
    direct_rng = rng_for("analysis_tasks/direct", split, seed)  # its own stream: the tasks do not depend on it
    sources, weights = zip(*[(k, float(w)) for k, w in mix.items() if float(w) > 0])
    seen: set = set()
    rows: List[Dict[str, Any]] = []
    pending: List[tuple] = []  # (task, workspace_id) of the rows that need their code run
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"generator:analysis_tasks: could not draw {n} distinct {split} tasks "
                             f"({len(rows)} found)")
        source = rng.choices(sources, weights)[0]
        task = _make_task(rng, source, rng.choice(kinds))
        if task is None or task.key in seen or task_split(task.key) != split:
            continue
        if (form == "single" or wanted is not None) and source != "qa":
            continue
        if wanted is not None and question_kind(task.key) not in wanted:
            continue
        seen.add(task.key)
        workspace_id = "t" + hashlib.blake2b(task.key.encode(), digest_size=8).hexdigest()
        sizes = _materialise(task, root, workspace_id)
        prompt = prompt_text(task.instruction, sizes)
        if form == "single":
            rows.append({"messages": [
                {"role": "user", "content": f"# Instruction\n{task.instruction}\n\n# Data\n{task.tables}"},
                {"role": "assistant", "content": single_ability_response(task)}]})
            continue
        pending.append((task, workspace_id))
        if form == "trajectory":
            direct = source == "qa" and direct_rng.random() < float(direct_fraction)
            rows.append({"messages": [{"role": "user", "content": prompt},
                                      {"role": "assistant", "content": direct_response(task) if direct else None}]})
            continue
        rows.append({
            "prompt": [{"role": "user", "content": prompt}],
            "data_source": source,
            "input_seq": task.instruction,
            "workspace_id": workspace_id,
            "data": DATA_SUBDIR,
            "reward_spec": {"method": METHOD_OF[source], "ground_truth": task.ground_truth,
                            "function": [JUDGE_OF[source]], "response": None},
            "env_class": "deepanalyze",
            "workspace_root": str(root),
            "answer": task.expected_output if source != "research" else None,  # gold answer, scored by the reward
        })
    if pending:  # fill in the worked trajectories, with what their code really printed
        for row, (task, _), output in zip(rows, pending, run_solutions(pending, root)):
            if form == "trajectory":
                if row["messages"][1]["content"] is None:
                    row["messages"][1]["content"] = worked_response(task, output)
            else:
                row["reward_spec"]["response"] = worked_response(task, output)
    return rows


def solution_code(row: Dict[str, Any]) -> str:
    """The code of a row's worked response (its first fenced block), for tests and SFT warm-ups."""
    response = row["reward_spec"]["response"]
    return textwrap.dedent(response.split("```python\n", 1)[1].split("\n```", 1)[0])


__all__ = ["FILE_KINDS", "FORMS", "QA_KINDS", "analysis_tasks", "direct_response", "prompt_text", "run_solutions",
           "question_kind", "single_ability_response", "solution_code", "worked_response"]
