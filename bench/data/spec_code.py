"""Read a CSV file of orders and print a summary per customer."""

import csv
import sys
from dataclasses import dataclass, field
from datetime import date


@dataclass
class Order:
    order_id: str
    customer: str
    day: date
    amount: float
    items: int


@dataclass
class Summary:
    customer: str
    orders: int = 0
    total: float = 0.0
    items: int = 0
    first: date | None = None
    last: date | None = None
    days: set[date] = field(default_factory=set)

    def add(self, order: Order) -> None:
        self.orders += 1
        self.total += order.amount
        self.items += order.items
        self.days.add(order.day)
        if self.first is None or order.day < self.first:
            self.first = order.day
        if self.last is None or order.day > self.last:
            self.last = order.day

    def average(self) -> float:
        return self.total / self.orders if self.orders else 0.0


def parse_line(row: dict[str, str]) -> Order:
    """One CSV row as an Order; raises ValueError on a bad row."""
    year, month, day = (int(x) for x in row["date"].split("-"))
    amount = float(row["amount"])
    if amount < 0:
        raise ValueError(f"negative amount in order {row['order_id']}")
    return Order(
        order_id=row["order_id"],
        customer=row["customer"].strip(),
        day=date(year, month, day),
        amount=amount,
        items=int(row["items"]),
    )


def read_orders(path: str) -> list[Order]:
    orders = []
    with open(path, newline="") as f:
        for number, row in enumerate(csv.DictReader(f), start=2):
            try:
                orders.append(parse_line(row))
            except (KeyError, ValueError) as e:
                print(f"{path}:{number}: skipped: {e}", file=sys.stderr)
    return orders


def summarize(orders: list[Order]) -> dict[str, Summary]:
    out: dict[str, Summary] = {}
    for order in orders:
        summary = out.get(order.customer)
        if summary is None:
            summary = out[order.customer] = Summary(order.customer)
        summary.add(order)
    return out


def report(summaries: dict[str, Summary]) -> str:
    lines = [f"{'customer':<20}{'orders':>8}{'total':>12}{'average':>10}{'items':>8}  first       last"]
    for s in sorted(summaries.values(), key=lambda s: -s.total):
        lines.append(
            f"{s.customer:<20}{s.orders:>8}{s.total:>12.2f}{s.average():>10.2f}{s.items:>8}  {s.first}  {s.last}"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: orders.py FILE.csv", file=sys.stderr)
        return 2
    orders = read_orders(argv[1])
    if not orders:
        print("no orders", file=sys.stderr)
        return 1
    print(report(summarize(orders)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
