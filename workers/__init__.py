"""RQ side of intergiro-receiver: deliver order-status updates to the merchant."""
