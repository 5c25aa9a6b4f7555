"""Writes store_seed.json, the seed of the scenario SQLite store (run once; the JSON is shipped).

`python simulator/data/make_store_seed.py` regenerates it deterministically. Values are plausible, small and varied
so scenario instances differ (status, delay, stock, eligibility, issue kind).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CATEGORIES = {
    "headphones": [
        ("AirTone Wireless Earbuds", 59.0),
        ("BassPro Over-Ear Headphones", 89.0),
        ("StudioLite Headphones", 129.0),
        ("RunFit Sport Earbuds", 39.0),
    ],
    "phone_case": [("ArmorShell Phone Case", 19.0), ("SlimClear Phone Case", 12.0), ("LeatherFold Wallet Case", 29.0)],
    "kettle": [("QuickBoil Electric Kettle", 35.0), ("TempSet Glass Kettle", 49.0), ("TravelMini Kettle", 25.0)],
    "backpack": [("CityCommute Backpack", 55.0), ("TrailLite Hiking Pack", 75.0), ("LaptopPro Backpack", 65.0)],
    "running_shoes": [("SwiftStride Running Shoes", 95.0), ("CloudStep Trainers", 110.0), ("TrailGrip Shoes", 120.0)],
    "desk_lamp": [("BrightArc LED Desk Lamp", 42.0), ("FlexNeck Reading Lamp", 28.0)],
    "blender": [("PowerBlend 600 Blender", 79.0), ("SmoothiePro Personal Blender", 45.0)],
}
CARRIERS = ["SwiftShip", "ParcelGo", "ExpressLine"]
RESTAURANTS = [
    ("Golden Wok", ["Kung Pao Chicken", "Fried Rice", "Spring Rolls", "Hot and Sour Soup"]),
    ("Pizza Piazza", ["Margherita Pizza", "Garlic Bread", "Caesar Salad", "Tiramisu"]),
    ("Burger Barn", ["Classic Burger", "Cheese Fries", "Onion Rings", "Milkshake"]),
    ("Spice Route", ["Chicken Tikka Masala", "Garlic Naan", "Samosa", "Mango Lassi"]),
    ("Sushi Zen", ["Salmon Roll", "Miso Soup", "Edamame", "Tuna Nigiri"]),
    ("Taco Town", ["Beef Tacos", "Chicken Burrito", "Nachos", "Churros"]),
]


def main() -> None:
    rng = random.Random(20261121)
    products = []
    sku = 1000
    for cat, items in CATEGORIES.items():
        for name, price in items:
            sku += 1
            products.append(
                {
                    "sku": f"SKU{sku}",
                    "name": name,
                    "category": cat,
                    "price": price,
                    "stock": rng.choice([0, 0, 2, 5, 12, 30, 80]),
                    "rating": round(rng.uniform(3.4, 4.9), 1),
                    "warranty_months": rng.choice([6, 12, 24]),
                }
            )
    orders = []
    statuses = ["processing", "shipped", "in_transit", "delayed", "delivered", "delivered"]
    for i in range(60):
        p = rng.choice(products)
        status = statuses[i % len(statuses)]
        placed = rng.randint(2, 40)
        promised = rng.choice([3, 5, 7])
        delay = rng.randint(2, 9) if status == "delayed" else (rng.choice([0, 0, 1]) if status == "in_transit" else 0)
        delivered_days_ago = rng.randint(1, 35) if status == "delivered" else None
        orders.append(
            {
                "order_id": f"{480000 + i * 37}",
                "customer": f"C{rng.randint(1000, 9999)}",
                "sku": p["sku"],
                "qty": rng.choice([1, 1, 1, 2]),
                "status": status,
                "placed_days_ago": placed,
                "promised_days": promised,
                "delay_days": delay,
                "carrier": rng.choice(CARRIERS),
                "tracking": f"TRK{rng.randint(10**7, 10**8 - 1)}",
                "delivered_days_ago": delivered_days_ago,
                "return_eligible": bool(
                    status == "delivered" and delivered_days_ago is not None and delivered_days_ago <= 30
                ),
            }
        )
    food = []
    issues = ["late", "damaged", "missing"]
    for i in range(60):
        rest, menu = rng.choice(RESTAURANTS)
        items = rng.sample(menu, rng.randint(2, 3))
        prices = [round(rng.uniform(4, 16), 2) for _ in items]
        issue = issues[i % 3]
        promised = rng.choice([30, 35, 40, 45])
        actual = promised + (rng.randint(20, 70) if issue == "late" else rng.randint(-5, 8))
        food.append(
            {
                "order_id": f"F{730000 + i * 53}",
                "restaurant": rest,
                "items": [{"name": n, "price": pr} for n, pr in zip(items, prices, strict=True)],
                "total": round(sum(prices) + 2.99, 2),
                "delivery_fee": 2.99,
                "promised_min": promised,
                "actual_min": actual,
                "issue": issue,
                "issue_item": rng.choice(items) if issue != "late" else None,
                "rider": rng.choice(["Ahmed", "Bea", "Chen", "Dara", "Eli"]),
                "user_has_photo": rng.random() < 0.7,
                "prior_vouchers_90d": rng.choice([0, 0, 0, 1, 2]),
            }
        )
    policies = {
        "ecommerce.return_window_days": 30,
        "ecommerce.refund_processing_days": 5,
        "ecommerce.delay_voucher_threshold_days": 5,
        "ecommerce.voucher_value": 10.0,
        "food.voucher_value": 5.0,
        "food.late_threshold_min": 20,
        "food.max_vouchers_per_order": 1,
        "food.partial_refund_max_fraction": 0.5,
        "food.evidence_required_for": ["damaged", "missing"],
    }
    out = {"products": products, "orders": orders, "food_orders": food, "policies": policies}
    path = Path(__file__).with_name("store_seed.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}: {len(products)} products, {len(orders)} orders, {len(food)} food orders")


if __name__ == "__main__":
    main()
