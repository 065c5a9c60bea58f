"""Realistic callback tokens for the benchmarks: RS256, about 2 KB, two events, one unique order each.

RSA signing costs about a millisecond, so the pool is cached on disk (`bench/.cache/`) and only grown
when a run needs more; a fresh Redis per run makes reusing the same tokens across runs harmless.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from receiver.tools.send import sign_order

CACHE = Path(__file__).resolve().parent / ".cache"
ISSUED_AT = 1_767_225_600  # 2026-01-01, in seconds as Intergiro's newer docs say (PyJWT reads only seconds)


def bench_key(cache: Path = CACHE) -> rsa.RSAPrivateKey:
    """The bench's signing key (made once, kept in the cache; the servers trust its public half)."""
    path = cache / "bench-key.pem"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(loaded, rsa.RSAPrivateKey)
    return loaded


def public_pem(cache: Path = CACHE) -> str:
    return (
        bench_key(cache)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def order_id(index: int) -> str:
    return f"bench{index:011d}"


def bench_order(index: int, events: int = 2) -> dict[str, Any]:
    """A card order in the shape of Intergiro's real callbacks (camelCase), ordered and charged
    (`events=1`: only ordered, as the first callback of a progressive order carries)."""
    oid = order_id(index)
    return {
        "id": oid,
        "number": f"shop-{index:08d}",
        "client": "4aT8iQ2ZbG9cWm1R",
        "created": "2026-01-01T09:00:00.000Z",
        "items": [
            {
                "number": "ts001-b",
                "name": "Basic T-shirt, black, size M",
                "price": 119.6,
                "vat": 29.9,
                "quantity": 2,
                "unit": "pcs",
            },
            {"number": "ts001-w", "name": "Basic T-shirt, white, size L", "price": 119.6, "vat": 29.9},
            {"number": "ship-se", "name": "Shipping within Sweden", "price": 39.2, "vat": 9.8},
        ],
        "currency": "SEK",
        "customer": {
            "type": "person",
            "identityNumber": "197001011234",
            "name": {"first": "Anna", "last": "Andersson"},
            "address": {
                "street": "Storgatan 1",
                "zipCode": "11122",
                "city": "Stockholm",
                "countryCode": "SE",
            },
            "email": "anna.andersson@example.com",
            "phone": "+46701234567",
        },
        "payment": {
            "type": "card",
            "service": "cardfunc",
            "status": "created",
            "scheme": "visa",
            "iin": "411111",
            "last4": "1111",
            "expires": [2, 28],
            "reference": f"252d7664-3f8e-4c1b-9a7d-{index:012d}",
            "amount": 497.5,
            "currency": "SEK",
            "card": "eyJhbGciOiJSUzI1NiJ9.eyJzY2hlbWUiOiJ2aXNhIiwiaWluIjoiNDExMTExIiwibGFzdDQiOiIxMTExIn0."
            "c2lnbmF0dXJlLW9mLWEtY2FyZC10b2tlbi10aGF0LWlzLWxvbmctZW5vdWdoLXRvLWJlLXJlYWxpc3RpYw",
        },
        "meta": {"cart": f"cart-{index}", "channel": "web", "campaign": "spring-sale"},
        "event": [
            {"type": "order", "date": "2026-01-01T09:00:01.000Z"},
            {"type": "charge", "date": "2026-01-01T09:00:05.000Z", "reference": f"charge-{index}"},
        ][:events],
    }


def _sign_range(args: tuple[Path, int, int, int]) -> list[str]:
    cache, start, stop, events = args
    key = bench_key(cache)
    return [sign_order(bench_order(i, events), key, "production", iat=ISSUED_AT) for i in range(start, stop)]


def token_pool(count: int, cache: Path = CACHE, events: int = 2) -> list[bytes]:
    """`count` tokens of distinct orders (0 .. count-1) with `events` events each, signing only those
    not cached yet."""
    path = cache / ("tokens.txt" if events == 2 else f"tokens-{events}-event.txt")
    bench_key(cache)
    have = path.read_bytes().split(b"\n")[:-1] if path.exists() else []
    if len(have) < count:
        chunks = [(cache, s, min(s + 2000, count), events) for s in range(len(have), count, 2000)]
        with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            with path.open("ab") as out:
                for signed in pool.map(_sign_range, chunks):
                    out.write("".join(t + "\n" for t in signed).encode())
        have = path.read_bytes().split(b"\n")[:-1]
    return have[:count]
