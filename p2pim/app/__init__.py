"""``p2pim app``: the messenger as a local web page (issue 18)."""
