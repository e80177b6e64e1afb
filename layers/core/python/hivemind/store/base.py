"""Plumbing shared by the repositories: records, one DynamoDB table wrapper, transactions, cursors.

Repositories speak pydantic records; this module turns them into DynamoDB attribute values and back,
maps AWS errors onto the product's error hierarchy, and gives pagination an opaque cursor that cannot
be pointed at another partition.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from decimal import Decimal
from typing import Any, Generic, NoReturn, Self, TypeVar

from boto3.dynamodb.types import TypeDeserializer, TypeSerializer
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import BaseModel, ConfigDict

from hivemind.canonical import canonical_json
from hivemind.encoding import b64decode, b64encode
from hivemind.errors import Conflict, InvalidInput, ServiceUnavailable, StoreError
from hivemind.store.config import AwsClients
from hivemind.store.schema import SCHEMA, TableRole

Clock = Callable[[], int]


def system_clock() -> int:
    """Integer Unix seconds: every stored time is an integer (signed documents hold no floats)."""
    return int(time.time())


# --- records ---------------------------------------------------------------------------------------


class Record(BaseModel):
    """Base of stored records: unknown fields are refused on input, records are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_item(self) -> dict[str, Any]:
        """The plain item (``None`` fields left out, so sparse index keys stay absent)."""
        return {key: value for key, value in self.model_dump(mode="json").items() if value is not None}

    @classmethod
    def from_item(cls, item: Mapping[str, Any]) -> Self:
        """Parse an item, ignoring storage-only attributes (sort keys, sparse index keys)."""
        return cls.model_validate({key: value for key, value in item.items() if key in cls.model_fields})


T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    """One page of a listing; pass ``cursor`` back to get the next page (``None``: no more).

    A filtered listing may return fewer items than asked for, even none, while more remain: only a
    ``None`` cursor means the end.
    """

    items: list[T]
    cursor: str | None = None


# --- attribute values ------------------------------------------------------------------------------

_serializer = TypeSerializer()
_deserializer = TypeDeserializer()


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal):
        if value != value.to_integral_value():
            raise StoreError("stored number is not an integer; the store never writes floats")
        return int(value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def serialize(item: Mapping[str, Any]) -> dict[str, Any]:
    """Plain mapping to DynamoDB attribute values; ``None`` attributes are omitted."""
    try:
        return {key: _serializer.serialize(value) for key, value in item.items() if value is not None}
    except TypeError as exc:
        raise StoreError(f"cannot store value: {exc}") from None


def serialize_value(value: Any) -> dict[str, Any]:
    try:
        return _serializer.serialize(value)
    except TypeError as exc:
        raise StoreError(f"cannot store value: {exc}") from None


def deserialize(item: Mapping[str, Any]) -> dict[str, Any]:
    return {key: _plain(_deserializer.deserialize(value)) for key, value in item.items()}


# --- errors ----------------------------------------------------------------------------------------


class ConditionFailed(Exception):
    """A conditional write found the item in another state. Repositories turn it into a domain error."""


class TransactionCancelled(Exception):
    """A transaction was cancelled; ``reasons[i]`` is the code for the i-th operation ("None" if fine)."""

    def __init__(self, reasons: list[str]) -> None:
        super().__init__(f"transaction cancelled: {reasons}")
        self.reasons = reasons

    def condition_failed(self, index: int) -> bool:
        return index < len(self.reasons) and self.reasons[index] == "ConditionalCheckFailed"


_UNAVAILABLE_CODES = {
    "ProvisionedThroughputExceededException",
    "ThrottlingException",
    "RequestLimitExceeded",
    "InternalServerError",
    "ServiceUnavailable",
    "TransactionInProgressException",
    # Another transaction touched the same item at the same moment: nothing was written; a retry works.
    "TransactionConflictException",
}


def raise_store_error(exc: ClientError | BotoCoreError, what: str) -> NoReturn:
    """Map an AWS failure that is not a domain answer onto :class:`StoreError` / ``ServiceUnavailable``."""
    if isinstance(exc, BotoCoreError):
        raise ServiceUnavailable(f"{what}: storage unreachable ({type(exc).__name__})") from exc
    code = exc.response.get("Error", {}).get("Code", "")
    if code in _UNAVAILABLE_CODES:
        raise ServiceUnavailable(f"{what}: storage is busy ({code}); retry") from exc
    if code == "ResourceNotFoundException":
        raise StoreError(f"{what}: table missing; create the deployment first") from exc
    raise StoreError(f"{what}: {code or 'storage error'}") from exc


# --- cursors ---------------------------------------------------------------------------------------


def encode_cursor(last_key: Mapping[str, Any] | None) -> str | None:
    if not last_key:
        return None
    return b64encode(canonical_json(deserialize(last_key)))


def decode_cursor(cursor: str, scope: Mapping[str, Any]) -> dict[str, Any]:
    """The DynamoDB start key in ``cursor``; it must lie in the partition ``scope`` names."""
    try:
        value = json.loads(b64decode(cursor))
    except (InvalidInput, ValueError):
        raise InvalidInput("invalid pagination cursor") from None
    if not isinstance(value, dict) or not all(
        isinstance(key, str) and isinstance(item, str | int) and not isinstance(item, bool)
        for key, item in value.items()
    ):
        raise InvalidInput("invalid pagination cursor")
    for key, expected in scope.items():
        if value.get(key) != expected:
            raise InvalidInput("pagination cursor belongs to another listing")
    return serialize(value)


# --- table -----------------------------------------------------------------------------------------

MAX_PAGE = 100


class Table:
    """One table of the deployment, addressed by role; every method speaks plain dicts."""

    def __init__(self, clients: AwsClients, role: TableRole) -> None:
        self.clients = clients
        self.role = role
        self.spec = SCHEMA.table(role)
        self.name = clients.config.table_name(role)

    @property
    def _client(self) -> Any:
        return self.clients.dynamodb

    def key_of(self, item: Mapping[str, Any]) -> dict[str, Any]:
        key = {self.spec.partition_key.name: item[self.spec.partition_key.name]}
        if self.spec.sort_key is not None:
            key[self.spec.sort_key.name] = item[self.spec.sort_key.name]
        return key

    def get(self, key: Mapping[str, Any], *, consistent: bool = True) -> dict[str, Any] | None:
        try:
            response = self._client.get_item(
                TableName=self.name, Key=serialize(key), ConsistentRead=consistent
            )
        except (ClientError, BotoCoreError) as exc:
            raise_store_error(exc, f"read {self.role}")
        item = response.get("Item")
        return deserialize(item) if item else None

    def put(
        self,
        item: Mapping[str, Any],
        *,
        condition: str | None = None,
        names: Mapping[str, str] | None = None,
        values: Mapping[str, Any] | None = None,
    ) -> None:
        request: dict[str, Any] = {"TableName": self.name, "Item": serialize(item)}
        _add_expression(request, condition=condition, names=names, values=values)
        self._write("put_item", request)

    def put_new(self, item: Mapping[str, Any], *, what: str) -> None:
        """Create ``item``; an identical item already there is success (a retried create), anything else
        under that key is :class:`Conflict`."""
        try:
            self.put(item, condition="attribute_not_exists(#pk)", names={"#pk": self.spec.partition_key.name})
        except ConditionFailed:
            existing = self.get(self.key_of(item))
            if existing != {key: value for key, value in item.items() if value is not None}:
                raise Conflict(f"{what} already exists") from None

    def update(
        self,
        key: Mapping[str, Any],
        *,
        update: str,
        condition: str | None = None,
        names: Mapping[str, str] | None = None,
        values: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Apply ``update`` and return the item as it is afterwards."""
        request: dict[str, Any] = {
            "TableName": self.name,
            "Key": serialize(key),
            "UpdateExpression": update,
            "ReturnValues": "ALL_NEW",
        }
        _add_expression(request, condition=condition, names=names, values=values)
        response = self._write("update_item", request)
        return deserialize(response.get("Attributes", {}))

    def delete(
        self,
        key: Mapping[str, Any],
        *,
        condition: str | None = None,
        names: Mapping[str, str] | None = None,
        values: Mapping[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        """Delete and return the old item (``None`` if there was none)."""
        request: dict[str, Any] = {"TableName": self.name, "Key": serialize(key), "ReturnValues": "ALL_OLD"}
        _add_expression(request, condition=condition, names=names, values=values)
        response = self._write("delete_item", request)
        old = response.get("Attributes")
        return deserialize(old) if old else None

    def delete_many(self, keys: list[dict[str, Any]]) -> None:
        """Unconditional deletes in batches of 25, retrying unprocessed keys."""
        for start in range(0, len(keys), 25):
            pending: list[dict[str, Any]] = [
                {"DeleteRequest": {"Key": serialize(key)}} for key in keys[start : start + 25]
            ]
            for attempt in range(8):
                try:
                    response = self._client.batch_write_item(RequestItems={self.name: pending})
                except (ClientError, BotoCoreError) as exc:
                    raise_store_error(exc, f"remove items of {self.role}")
                pending = response.get("UnprocessedItems", {}).get(self.name, [])
                if not pending:
                    break
                time.sleep(0.05 * 2**attempt)
            if pending:
                raise ServiceUnavailable(f"remove items of {self.role}: storage kept throttling; retry")

    def query(
        self,
        *,
        key_condition: str,
        values: Mapping[str, Any],
        scope: Mapping[str, Any],
        names: Mapping[str, str] | None = None,
        index: str | None = None,
        filter_expression: str | None = None,
        limit: int = MAX_PAGE,
        cursor: str | None = None,
        newest_first: bool = False,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of a query. ``scope`` is the partition the cursor must stay in."""
        request: dict[str, Any] = {
            "TableName": self.name,
            "KeyConditionExpression": key_condition,
            "ExpressionAttributeValues": serialize(values),
            "Limit": max(1, min(limit, MAX_PAGE)),
            "ScanIndexForward": not newest_first,
        }
        if names:
            request["ExpressionAttributeNames"] = dict(names)
        if index is not None:
            request["IndexName"] = index
        else:
            request["ConsistentRead"] = True
        if filter_expression is not None:
            request["FilterExpression"] = filter_expression
        if cursor is not None:
            request["ExclusiveStartKey"] = decode_cursor(cursor, scope)
        try:
            response = self._client.query(**request)
        except (ClientError, BotoCoreError) as exc:
            raise_store_error(exc, f"query {self.role}")
        items = [deserialize(item) for item in response.get("Items", [])]
        return items, encode_cursor(response.get("LastEvaluatedKey"))

    def query_partition(
        self,
        index: str,
        attribute: str,
        value: str,
        *,
        cursor: str | None,
        limit: int,
        newest_first: bool = False,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of the items of ``index`` whose partition key ``attribute`` is ``value``."""
        return self.query(
            index=index,
            key_condition="#pk = :value",
            names={"#pk": attribute},
            values={":value": value},
            scope={attribute: value},
            cursor=cursor,
            limit=limit,
            newest_first=newest_first,
        )

    def query_all(self, **query: Any) -> Iterator[dict[str, Any]]:
        """Every item a query matches, page after page."""
        cursor: str | None = None
        while True:
            items, cursor = self.query(**query, cursor=cursor)
            yield from items
            if cursor is None:
                return

    def scan_page(
        self, *, limit: int = MAX_PAGE, cursor: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of a full scan. Only for operator listings of small tables, never a request path."""
        request: dict[str, Any] = {"TableName": self.name, "Limit": max(1, min(limit, MAX_PAGE))}
        if cursor is not None:
            request["ExclusiveStartKey"] = decode_cursor(cursor, {})
        try:
            response = self._client.scan(**request)
        except (ClientError, BotoCoreError) as exc:
            raise_store_error(exc, f"list {self.role}")
        return [deserialize(item) for item in response.get("Items", [])], encode_cursor(
            response.get("LastEvaluatedKey")
        )

    # --- transaction operations (see :func:`transact`) ---

    def put_op(
        self,
        item: Mapping[str, Any],
        *,
        condition: str | None = None,
        names: Mapping[str, str] | None = None,
        values: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        op: dict[str, Any] = {"TableName": self.name, "Item": serialize(item)}
        _add_expression(op, condition=condition, names=names, values=values)
        return {"Put": op}

    def update_op(
        self,
        key: Mapping[str, Any],
        *,
        update: str,
        condition: str | None = None,
        names: Mapping[str, str] | None = None,
        values: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        op: dict[str, Any] = {"TableName": self.name, "Key": serialize(key), "UpdateExpression": update}
        _add_expression(op, condition=condition, names=names, values=values)
        return {"Update": op}

    def delete_op(
        self,
        key: Mapping[str, Any],
        *,
        condition: str | None = None,
        names: Mapping[str, str] | None = None,
        values: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        op: dict[str, Any] = {"TableName": self.name, "Key": serialize(key)}
        _add_expression(op, condition=condition, names=names, values=values)
        return {"Delete": op}

    def check_op(
        self,
        key: Mapping[str, Any],
        *,
        condition: str,
        names: Mapping[str, str] | None = None,
        values: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        op: dict[str, Any] = {"TableName": self.name, "Key": serialize(key)}
        _add_expression(op, condition=condition, names=names, values=values)
        return {"ConditionCheck": op}

    def _write(self, operation: str, request: dict[str, Any]) -> dict[str, Any]:
        try:
            return getattr(self._client, operation)(**request)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException":
                raise ConditionFailed(self.role.value) from None
            raise_store_error(exc, f"write {self.role}")
        except BotoCoreError as exc:
            raise_store_error(exc, f"write {self.role}")


def _add_expression(
    request: dict[str, Any],
    *,
    condition: str | None,
    names: Mapping[str, str] | None,
    values: Mapping[str, Any] | None,
) -> None:
    if condition is not None:
        request["ConditionExpression"] = condition
    if names:
        request["ExpressionAttributeNames"] = {**request.get("ExpressionAttributeNames", {}), **names}
    if values:
        request["ExpressionAttributeValues"] = {
            **request.get("ExpressionAttributeValues", {}),
            **{name: serialize_value(value) for name, value in values.items()},
        }


def transact(clients: AwsClients, operations: list[dict[str, Any]], *, what: str) -> None:
    """Run ``operations`` (from the ``*_op`` builders) as one all-or-nothing DynamoDB transaction.

    Raises :class:`TransactionCancelled` with one reason code per operation when any condition fails
    or another transaction touched the same items.
    """
    if not 0 < len(operations) <= 100:
        raise StoreError(f"{what}: a transaction holds 1 to 100 operations")
    try:
        clients.dynamodb.transact_write_items(TransactItems=operations)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "TransactionCanceledException":
            reasons = [reason.get("Code", "None") for reason in exc.response.get("CancellationReasons", [])]
            raise TransactionCancelled(reasons) from None
        raise_store_error(exc, what)
    except BotoCoreError as exc:
        raise_store_error(exc, what)
