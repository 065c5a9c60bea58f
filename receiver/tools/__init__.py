"""The developer's tools: `dev` (the whole product on one machine), `send` (sign and POST an order as
Intergiro does), the local merchant sink and the keys `dev` makes."""
