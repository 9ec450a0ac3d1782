"""Warehouse migrations: ``NNN_name.sql`` files applied in order by mining.warehouse (package data)."""
