"""Admission: checks the API server asks the operator for before it stores an object.

The CRD schema and its CEL rules see one object; what needs another object
(a Volume's fork or restore source) is checked here, by a validating webhook
every operator replica serves (admission.server), so `kubectl apply` fails
with the field named instead of a Volume that only says so in a condition.
"""
