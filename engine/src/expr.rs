//! SQL expressions of a view: derived columns, the view's filter and per-feature
//! filters (DESIGN §3b), evaluated column-at-a-time on Arrow batches.
//!
//! Parsing, type coercion and evaluation are DataFusion's (`datafusion-sql`'s parser
//! and planner, `datafusion-optimizer`'s coercion and simplifier,
//! `datafusion-physical-expr`, the scalar functions of `datafusion-functions`); this
//! module is the only one that names them. The rest of the engine sees [`Program`]:
//! one view's expressions, checked for syntax when the feature file loads and compiled
//! against a batch's schema the first time a batch of that schema arrives (a feature
//! file does not declare the events' types; `panes check --events` and backfill compile
//! against their event file's schema before ingesting anything).
//!
//! # Rows whose expression fails
//! A batch is evaluated as a whole. When that fails (an integer division by zero, a
//! `CAST` that cannot convert a value), the batch is split in halves until the failing
//! rows are single rows: each such row gets null for that expression and is counted as
//! an `expr_error`, and every other row keeps its value. Division by zero fails for
//! floating-point operands too (SQL has no infinities from `/`; DataFusion's kernels would
//! give ±inf or NaN), through a check wrapped around every floating-point divisor.

use std::collections::HashMap;
use std::fmt;
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};

use arrow_array::{Array, ArrayRef, BooleanArray, Int64Array, RecordBatch, new_null_array};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use datafusion_common::config::ConfigOptions;
use datafusion_common::tree_node::{Transformed, TreeNode};
use datafusion_common::{DFSchema, DataFusionError, TableReference, plan_err};
use datafusion_expr::execution_props::ExecutionProps;
use datafusion_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion_expr::planner::ExprPlanner;
use datafusion_expr::simplify::SimplifyContext;
use datafusion_expr::{
    AggregateUDF, BinaryExpr, ColumnarValue, Expr, ExprSchemable, HigherOrderUDF, Operator,
    ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, TableSource, Volatility, WindowUDF,
};
use datafusion_optimizer::simplify_expressions::ExprSimplifier;
use datafusion_physical_expr::{PhysicalExpr, create_physical_expr};
use datafusion_sql::planner::{ContextProvider, PlannerContext, SqlToRel};
use datafusion_sql::sqlparser::ast::{Expr as SqlExpr, Spanned, visit_expressions};
use datafusion_sql::sqlparser::dialect::GenericDialect;
use datafusion_sql::sqlparser::parser::Parser;
use datafusion_sql::sqlparser::tokenizer::Token;

/// Why an expression cannot be used: the message and, when known, where in the
/// expression (1-based line and column).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExprError {
    /// What is wrong.
    pub message: String,
    /// Line and column in the expression's text.
    pub position: Option<(u64, u64)>,
}

impl fmt::Display for ExprError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some((line, column)) = self.position {
            write!(f, " (at line {line}, column {column})")?;
        }
        Ok(())
    }
}

impl ExprError {
    fn new(message: impl Into<String>) -> Self {
        ExprError {
            message: message.into(),
            position: None,
        }
    }

    /// From a DataFusion error: its first line, with the position of its diagnostic
    /// when the planner attached one (the parser writes "at Line: L, Column: C").
    fn from_datafusion(e: &DataFusionError) -> Self {
        let position = e
            .diagnostic()
            .and_then(|d| d.span)
            .map(|s| (s.start.line, s.start.column));
        let text = match e.find_root() {
            DataFusionError::SQL(p, _) => p.to_string(),
            root => root.strip_backtrace(),
        };
        let mut message = text.lines().next().unwrap_or_default().trim().to_string();
        let mut position = position;
        if let Some(at) = message.find(" at Line: ") {
            let loc = message[at + 10..].to_string();
            message.truncate(at);
            let mut parts = loc.split(", Column: ");
            let line = parts.next().and_then(|l| l.trim().parse().ok());
            let column = parts.next().and_then(|c| c.trim().parse().ok());
            if let (Some(l), Some(c)) = (line, column) {
                position = position.or(Some((l, c)));
            }
        }
        for prefix in [
            "sql parser error: ",
            "ParserError(\"",
            "Error during planning: ",
            "Schema error: ",
        ] {
            if let Some(rest) = message.strip_prefix(prefix) {
                message = rest.trim_end_matches("\")").to_string();
            }
        }
        ExprError { message, position }
    }
}

/// Parses `sql` as one SQL scalar expression.
fn parse(sql: &str) -> Result<datafusion_sql::sqlparser::ast::Expr, ExprError> {
    let dialect = GenericDialect {};
    let mut parser = Parser::new(&dialect)
        .try_with_sql(sql)
        .map_err(|e| ExprError::from_datafusion(&DataFusionError::SQL(Box::new(e), None)))?;
    let ast = parser
        .parse_expr()
        .map_err(|e| ExprError::from_datafusion(&DataFusionError::SQL(Box::new(e), None)))?;
    let next = parser.peek_token();
    if next.token != Token::EOF {
        return Err(ExprError {
            message: format!("unexpected {} after the expression", next.token),
            position: Some((next.span.start.line, next.span.start.column)),
        });
    }
    let mut depth = Depth { now: 0 };
    if datafusion_sql::sqlparser::ast::Visit::visit(&ast, &mut depth).is_break() {
        return Err(ExprError::new(format!(
            "the expression nests more than {MAX_DEPTH} levels deep (a chain of {MAX_DEPTH} operators is that deep); split it into derived columns"
        )));
    }
    Ok(ast)
}

/// Deepest expression tree accepted. Planning, coercion and evaluation recurse once
/// per level; this keeps a tree far inside a server thread's stack (measured: 100
/// levels compile and run on a 512 KiB stack).
const MAX_DEPTH: usize = 100;

/// Tracks the depth of an expression tree; breaks past [`MAX_DEPTH`] (so the walk
/// itself never goes deeper).
struct Depth {
    now: usize,
}

impl datafusion_sql::sqlparser::ast::Visitor for Depth {
    type Break = ();

    fn pre_visit_expr(
        &mut self,
        _: &datafusion_sql::sqlparser::ast::Expr,
    ) -> std::ops::ControlFlow<()> {
        self.now += 1;
        if self.now > MAX_DEPTH {
            return std::ops::ControlFlow::Break(());
        }
        std::ops::ControlFlow::Continue(())
    }

    fn post_visit_expr(
        &mut self,
        _: &datafusion_sql::sqlparser::ast::Expr,
    ) -> std::ops::ControlFlow<()> {
        self.now -= 1;
        std::ops::ControlFlow::Continue(())
    }
}

/// Checks that `sql` is one SQL scalar expression (the load-time check: the columns it
/// names and their types are checked against the events' schema).
///
/// # Errors
/// The syntax error, with its position.
pub fn check_syntax(sql: &str) -> Result<(), ExprError> {
    parse(sql).map(|_| ())
}

/// The columns `sql` names, in order of first mention (as the planner resolves them:
/// unquoted names in lower case); none when it does not parse.
pub fn columns_of(sql: &str) -> Vec<String> {
    use datafusion_sql::sqlparser::ast::{Expr as Sql, visit_expressions};
    let Ok(ast) = parse(sql) else {
        return Vec::new();
    };
    let mut out: Vec<String> = Vec::new();
    let _ = visit_expressions(&ast, |e| {
        if let Sql::Identifier(id) = e {
            let name = match id.quote_style {
                Some(_) => id.value.clone(),
                None => id.value.to_lowercase(),
            };
            if !out.contains(&name) {
                out.push(name);
            }
        }
        std::ops::ControlFlow::<()>::Continue(())
    });
    out
}

/// The scalar functions expressions may call, by every name they go by.
fn functions() -> &'static HashMap<String, Arc<ScalarUDF>> {
    static FUNCTIONS: std::sync::OnceLock<HashMap<String, Arc<ScalarUDF>>> =
        std::sync::OnceLock::new();
    FUNCTIONS.get_or_init(|| {
        let mut m = HashMap::new();
        for f in datafusion_functions::all_default_functions() {
            for alias in f.aliases() {
                m.insert(alias.clone(), Arc::clone(&f));
            }
            m.insert(f.name().to_string(), f);
        }
        m
    })
}

/// The names of the scalar functions expressions may call, sorted (README, errors).
pub fn function_names() -> Vec<String> {
    let mut names: Vec<String> = functions().keys().cloned().collect();
    names.sort();
    names
}

/// What the SQL planner may look up: functions only, no tables.
struct Catalog {
    options: ConfigOptions,
    planners: Vec<Arc<dyn ExprPlanner>>,
}

impl Catalog {
    fn new() -> Self {
        let mut options = ConfigOptions::default();
        // Spans let the planner say where in the expression an unknown name is.
        options.sql_parser.collect_spans = true;
        Catalog {
            options,
            planners: vec![
                Arc::new(datafusion_functions::core::planner::CoreFunctionPlanner::default()),
                Arc::new(datafusion_functions::unicode::planner::UnicodeFunctionPlanner),
            ],
        }
    }
}

impl ContextProvider for Catalog {
    fn get_table_source(
        &self,
        name: TableReference,
    ) -> datafusion_common::Result<Arc<dyn TableSource>> {
        plan_err!("an expression reads the event's columns, not tables: {name}")
    }
    fn get_function_meta(&self, name: &str) -> Option<Arc<ScalarUDF>> {
        functions().get(name).cloned()
    }
    fn get_higher_order_meta(&self, _: &str) -> Option<Arc<HigherOrderUDF>> {
        None
    }
    fn get_aggregate_meta(&self, _: &str) -> Option<Arc<AggregateUDF>> {
        None
    }
    fn get_variable_type(&self, _: &[String]) -> Option<DataType> {
        None
    }
    fn get_window_meta(&self, _: &str) -> Option<Arc<WindowUDF>> {
        None
    }
    fn options(&self) -> &ConfigOptions {
        &self.options
    }
    fn udf_names(&self) -> Vec<String> {
        functions().keys().cloned().collect()
    }
    fn higher_order_function_names(&self) -> Vec<String> {
        Vec::new()
    }
    fn udaf_names(&self) -> Vec<String> {
        Vec::new()
    }
    fn udwf_names(&self) -> Vec<String> {
        Vec::new()
    }
    fn get_expr_planners(&self) -> &[Arc<dyn ExprPlanner>] {
        &self.planners
    }
}

/// `panes_divisor(l, r)`: `r`, or an error when `r` is zero where `l` is not null.
/// Wrapped around every floating-point divisor so that division by zero fails as it
/// does for integers (a null dividend gives null, as there).
#[derive(Debug, PartialEq, Eq, Hash)]
struct Divisor {
    signature: Signature,
}

impl ScalarUDFImpl for Divisor {
    fn name(&self) -> &str {
        "panes_divisor"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, args: &[DataType]) -> datafusion_common::Result<DataType> {
        Ok(args[1].clone())
    }
    fn invoke_with_args(
        &self,
        args: ScalarFunctionArgs,
    ) -> datafusion_common::Result<ColumnarValue> {
        let n = args.number_rows;
        let l = args.args[0].clone().into_array(n)?;
        let r = args.args[1].clone().into_array(n)?;
        let r64 = arrow_cast::cast(&r, &DataType::Float64)?;
        let r64 = r64
            .as_any()
            .downcast_ref::<arrow_array::Float64Array>()
            .expect("cast to Float64");
        if (0..n).any(|i| l.is_valid(i) && r64.is_valid(i) && r64.value(i) == 0.0) {
            return Err(DataFusionError::Execution("division by zero".into()));
        }
        Ok(args.args[1].clone())
    }
}

fn divisor() -> Arc<ScalarUDF> {
    static F: std::sync::OnceLock<Arc<ScalarUDF>> = std::sync::OnceLock::new();
    Arc::clone(F.get_or_init(|| {
        Arc::new(ScalarUDF::new_from_impl(Divisor {
            signature: Signature::any(2, Volatility::Immutable),
        }))
    }))
}

/// Where the innermost sub-expression of `ast` that cannot be planned and coerced on
/// its own begins (1-based line and column), if any does.
fn failing_part(
    ast: &SqlExpr,
    df: &DFSchema,
    catalog: &Catalog,
    simplifier: &ExprSimplifier,
) -> Option<(u64, u64)> {
    let mut at = None;
    // Pre-order: a later failing part lies inside an earlier one, or beside it.
    let _ = visit_expressions(ast, |e: &SqlExpr| {
        let fails = SqlToRel::new(catalog)
            .sql_to_expr(e.clone(), df, &mut PlannerContext::new())
            .and_then(|l| simplifier.coerce(l, df))
            .is_err();
        let span = e.span();
        if fails && span.start.line > 0 {
            at = Some((span.start.line, span.start.column));
        }
        ControlFlow::<()>::Continue(())
    });
    at
}

/// One expression compiled for one input schema.
#[derive(Debug)]
struct Compiled {
    expr: Arc<dyn PhysicalExpr>,
    data_type: DataType,
}

impl Compiled {
    fn new(sql: &str, schema: &Schema) -> Result<Self, ExprError> {
        let ast = parse(sql)?;
        let df = DFSchema::try_from(schema.clone()).map_err(|e| ExprError::from_datafusion(&e))?;
        let df = Arc::new(df);
        let catalog = Catalog::new();
        let simplifier = ExprSimplifier::new(
            SimplifyContext::builder()
                .with_schema(Arc::clone(&df))
                .build(),
        );
        Self::plan(&ast, &df, &catalog, &simplifier, schema).map_err(|mut e| {
            // Type errors carry no span: point at the innermost part that fails alone.
            if e.position.is_none() {
                e.position = failing_part(&ast, &df, &catalog, &simplifier);
            }
            e
        })
    }

    fn plan(
        ast: &SqlExpr,
        df: &Arc<DFSchema>,
        catalog: &Catalog,
        simplifier: &ExprSimplifier,
        schema: &Schema,
    ) -> Result<Self, ExprError> {
        let err = |e: DataFusionError| ExprError::from_datafusion(&e);
        let logical = SqlToRel::new(catalog)
            .sql_to_expr(ast.clone(), df, &mut PlannerContext::new())
            .map_err(err)?;
        let logical = simplifier.coerce(logical, df).map_err(err)?;
        // Floating-point divisors fail on zero, as integer ones do.
        let logical = logical
            .transform_up(|e| match e {
                Expr::BinaryExpr(BinaryExpr { left, op, right })
                    if matches!(op, Operator::Divide | Operator::Modulo)
                        && right.get_type(df.as_ref()).is_ok_and(|t| t.is_floating()) =>
                {
                    let right = Box::new(divisor().call(vec![(*left).clone(), *right]));
                    Ok(Transformed::yes(Expr::BinaryExpr(BinaryExpr {
                        left,
                        op,
                        right,
                    })))
                }
                e => Ok(Transformed::no(e)),
            })
            .map_err(err)?
            .data;
        let logical = simplifier.simplify(logical).map_err(err)?;
        let expr = create_physical_expr(
            &logical,
            df,
            &ExecutionProps::new(),
            &PhysicalPlanningContext::default(),
        )
        .map_err(err)?;
        let data_type = expr.data_type(schema).map_err(err)?;
        Ok(Compiled { expr, data_type })
    }

    /// The expression over every row of `batch`; a row where it fails is null and is
    /// marked in `failed` (one flag per row of `batch`).
    fn evaluate(&self, batch: &RecordBatch, failed: &mut [bool]) -> ArrayRef {
        let n = batch.num_rows();
        let whole = self
            .expr
            .evaluate(batch)
            .and_then(|v| v.into_array(n))
            .ok()
            .filter(|a| a.len() == n && a.data_type() == &self.data_type);
        if let Some(a) = whole {
            return a;
        }
        if n <= 1 {
            failed.iter_mut().for_each(|f| *f = true);
            return new_null_array(&self.data_type, n);
        }
        let half = n / 2;
        let (lo, hi) = failed.split_at_mut(half);
        let a = self.evaluate(&batch.slice(0, half), lo);
        let b = self.evaluate(&batch.slice(half, n - half), hi);
        arrow_select::concat::concat(&[a.as_ref(), b.as_ref()])
            .unwrap_or_else(|_| new_null_array(&self.data_type, n))
    }
}

/// A derived column: its name and expression.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Derived {
    /// Column name.
    pub name: String,
    /// SQL expression.
    pub expr: String,
}

/// A feature's filter: the feature, the column it reads (none: it counts rows) and
/// the filter, made into a column of the batch named `column_name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeatureFilter {
    /// The feature's name.
    pub feature: String,
    /// The column the feature reads, if any.
    pub column: Option<String>,
    /// SQL expression (a condition).
    pub filter: String,
    /// Name of the masked column the feature reads instead.
    pub column_name: String,
}

/// A view's expressions, in evaluation order.
pub struct Program {
    derived: Vec<Derived>,
    filter: Option<String>,
    features: Vec<FeatureFilter>,
    /// The program compiled for the last schema seen.
    bound: Mutex<Option<(SchemaRef, Arc<Bound>)>>,
}

impl fmt::Debug for Program {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Program")
            .field("derived", &self.derived)
            .field("filter", &self.filter)
            .field("features", &self.features)
            .finish_non_exhaustive()
    }
}

/// A program compiled for one input schema.
struct Bound {
    derived: Vec<Compiled>,
    filter: Option<Compiled>,
    features: Vec<Compiled>,
    schema: SchemaRef,
}

/// Where an expression of a view sits: `filter`, `columns.NAME` or
/// `features.NAME.filter`, for errors.
fn field_of_derived(name: &str) -> String {
    format!("columns.{name}.expr")
}

fn field_of_feature(name: &str) -> String {
    format!("features.{name}.filter")
}

/// A batch with the view's expressions applied.
#[derive(Debug)]
pub struct Applied {
    /// The batch's columns, then the derived columns, then the feature filters' masked
    /// columns.
    pub batch: RecordBatch,
    /// Per row, whether it belongs to the view (`None`: every row does).
    pub keep: Option<Vec<bool>>,
    /// Rows the view's filter left out.
    pub filtered: u64,
    /// Rows for which an expression could not be evaluated.
    pub expr_errors: u64,
}

/// An expression that cannot be compiled for a batch's schema: which one (a field as
/// the feature file names it) and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindError {
    /// `filter`, `columns.NAME.expr` or `features.NAME.filter`.
    pub field: String,
    /// Why.
    pub error: ExprError,
}

impl Program {
    /// A view's program (nothing to do when every part is empty).
    pub fn new(
        derived: Vec<Derived>,
        filter: Option<String>,
        features: Vec<FeatureFilter>,
    ) -> Self {
        Program {
            derived,
            filter,
            features,
            bound: Mutex::new(None),
        }
    }

    /// Whether the view has no expression (batches pass through untouched).
    pub fn is_empty(&self) -> bool {
        self.derived.is_empty() && self.filter.is_none() && self.features.is_empty()
    }

    /// Compiles every expression for batches of `schema`.
    ///
    /// # Errors
    /// The first expression that names an unknown column, mistypes, is not a
    /// condition where one is needed, or whose derived column would shadow a column of
    /// the batch.
    pub fn check(&self, schema: &SchemaRef) -> Result<(), BindError> {
        self.bind(schema).map(|_| ())
    }

    fn bind(&self, schema: &SchemaRef) -> Result<Arc<Bound>, BindError> {
        let mut cached = self.bound.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((s, b)) = cached.as_ref()
            && (Arc::ptr_eq(s, schema) || s == schema)
        {
            return Ok(Arc::clone(b));
        }
        let bound = Arc::new(self.compile(schema)?);
        *cached = Some((Arc::clone(schema), Arc::clone(&bound)));
        Ok(bound)
    }

    fn compile(&self, schema: &SchemaRef) -> Result<Bound, BindError> {
        let mut fields: Vec<Arc<Field>> = schema.fields().iter().cloned().collect();
        let mut derived = Vec::with_capacity(self.derived.len());
        for d in &self.derived {
            let field = field_of_derived(&d.name);
            if fields.iter().any(|f| f.name() == &d.name) {
                return Err(BindError {
                    field,
                    error: ExprError::new(format!(
                        "derived column {:?} has the name of a column of the events (or of an earlier derived column); rename it",
                        d.name
                    )),
                });
            }
            let c = Compiled::new(&d.expr, &Schema::new(fields.clone()))
                .map_err(|error| BindError { field, error })?;
            fields.push(Arc::new(Field::new(&d.name, c.data_type.clone(), true)));
            derived.push(c);
        }
        let with_derived = Schema::new(fields.clone());
        let condition = |sql: &str, field: String| -> Result<Compiled, BindError> {
            let c = Compiled::new(sql, &with_derived).map_err(|error| BindError {
                field: field.clone(),
                error,
            })?;
            if !matches!(c.data_type, DataType::Boolean | DataType::Null) {
                return Err(BindError {
                    field,
                    error: ExprError::new(format!(
                        "a filter must be a condition (a boolean); this expression has type {}",
                        c.data_type
                    )),
                });
            }
            Ok(c)
        };
        let filter = self
            .filter
            .as_deref()
            .map(|sql| condition(sql, "filter".to_string()))
            .transpose()?;
        let mut features = Vec::with_capacity(self.features.len());
        for f in &self.features {
            let field = field_of_feature(&f.feature);
            let c = condition(&f.filter, field.clone())?;
            let data_type = match &f.column {
                Some(col) => with_derived
                    .field_with_name(col)
                    .map(|x| x.data_type().clone())
                    .map_err(|_| BindError {
                        field: format!("features.{}.column", f.feature),
                        error: ExprError::new(format!(
                            "the events have no column {col:?} (nor does any derived column)"
                        )),
                    })?,
                None => DataType::Int64,
            };
            fields.push(Arc::new(Field::new(&f.column_name, data_type, true)));
            features.push(c);
        }
        Ok(Bound {
            derived,
            filter,
            features,
            schema: Arc::new(Schema::new(fields)),
        })
    }

    /// Applies the program to `batch`: derived columns, the view's filter, then each
    /// feature's filter as a masked copy of the column it reads.
    ///
    /// # Errors
    /// A [`BindError`] when the batch's schema does not fit an expression.
    pub fn apply(&self, batch: &RecordBatch) -> Result<Applied, BindError> {
        let bound = self.bind(&batch.schema())?;
        let n = batch.num_rows();
        let mut failed = vec![false; n];
        let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
        let with = |columns: &[ArrayRef], fields: usize| {
            let schema = Arc::new(Schema::new(bound.schema.fields()[..fields].to_vec()));
            RecordBatch::try_new_with_options(
                schema,
                columns.to_vec(),
                &arrow_array::RecordBatchOptions::new().with_row_count(Some(n)),
            )
            .expect("columns match the bound schema")
        };
        for d in &bound.derived {
            let b = with(&columns, columns.len());
            columns.push(d.evaluate(&b, &mut failed));
        }
        let b = with(&columns, columns.len());
        let keep = bound.filter.as_ref().map(|f| {
            let v = f.evaluate(&b, &mut failed);
            let mut keep = vec![false; n];
            if let Some(v) = v.as_any().downcast_ref::<BooleanArray>() {
                for (k, x) in keep.iter_mut().zip(v.iter()) {
                    *k = x == Some(true);
                }
            }
            keep
        });
        let kept = |i: usize| keep.as_ref().is_none_or(|k| k[i]);
        let mut feature_failed = vec![false; n];
        for (f, c) in self.features.iter().zip(&bound.features) {
            let v = c.evaluate(&b, &mut feature_failed);
            let drop: BooleanArray = match v.as_any().downcast_ref::<BooleanArray>() {
                Some(v) => v.iter().map(|x| Some(x != Some(true))).collect(),
                None => std::iter::repeat_n(Some(true), n).collect(),
            };
            let values: ArrayRef = match &f.column {
                Some(col) => b.column_by_name(col).cloned().expect("checked when bound"),
                None => Arc::new(Int64Array::from(vec![1i64; n])),
            };
            let masked = arrow_select::nullif::nullif(&values, &drop)
                .unwrap_or_else(|_| new_null_array(values.data_type(), n));
            columns.push(masked);
        }
        let filtered = keep
            .as_ref()
            .map_or(0, |k| k.iter().filter(|&&x| !x).count() as u64);
        let expr_errors = (0..n)
            .filter(|&i| failed[i] || (feature_failed[i] && kept(i)))
            .count() as u64;
        let batch = RecordBatch::try_new_with_options(
            Arc::clone(&bound.schema),
            columns,
            &arrow_array::RecordBatchOptions::new().with_row_count(Some(n)),
        )
        .expect("columns match the bound schema");
        Ok(Applied {
            batch,
            keep,
            filtered,
            expr_errors,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{Float64Array, StringArray};

    fn batch() -> RecordBatch {
        RecordBatch::try_from_iter(vec![
            (
                "a",
                Arc::new(Int64Array::from(vec![Some(6), Some(2), None, Some(4)])) as ArrayRef,
            ),
            (
                "b",
                Arc::new(Int64Array::from(vec![Some(3), Some(0), Some(3), Some(2)])) as ArrayRef,
            ),
            (
                "x",
                Arc::new(Float64Array::from(vec![
                    Some(1.5),
                    Some(0.0),
                    None,
                    Some(-2.0),
                ])) as ArrayRef,
            ),
            (
                "s",
                Arc::new(StringArray::from(vec![
                    Some("12"),
                    Some("abc"),
                    None,
                    Some("Hi"),
                ])) as ArrayRef,
            ),
        ])
        .unwrap()
    }

    fn derived(name: &str, expr: &str) -> Derived {
        Derived {
            name: name.into(),
            expr: expr.into(),
        }
    }

    #[test]
    fn derived_columns_see_earlier_ones_and_failing_rows_are_null() {
        let p = Program::new(
            vec![
                derived("q", "a / b"),
                derived("r", "q * 10 + x / x"),
                derived("n", "CAST(s AS BIGINT)"),
                derived(
                    "u",
                    "CASE WHEN a > 3 THEN upper(s) ELSE lower(s) || '!' END",
                ),
            ],
            None,
            vec![],
        );
        let out = p.apply(&batch()).unwrap();
        let col = |name: &str| out.batch.column_by_name(name).unwrap().clone();
        let q = col("q");
        let q = q.as_any().downcast_ref::<Int64Array>().unwrap();
        assert_eq!(q.iter().collect::<Vec<_>>(), [Some(2), None, None, Some(2)]);
        let r = col("r");
        let r = r.as_any().downcast_ref::<Float64Array>().unwrap();
        // Row 1: a / b fails (b = 0), and x / x is 0 / 0: both null.
        assert_eq!(
            r.iter().collect::<Vec<_>>(),
            [Some(21.0), None, None, Some(21.0)]
        );
        let n = col("n");
        let n = n.as_any().downcast_ref::<Int64Array>().unwrap();
        assert_eq!(n.iter().collect::<Vec<_>>(), [Some(12), None, None, None]);
        let u = col("u");
        let u = u.as_any().downcast_ref::<StringArray>().unwrap();
        assert_eq!(
            u.iter().collect::<Vec<_>>(),
            [Some("12"), Some("abc!"), None, Some("HI")]
        );
        // Rows 1 (a / b, x / x, the cast) and 3 (the cast of "Hi") failed.
        assert_eq!(out.expr_errors, 2);
        assert!(out.keep.is_none());
    }

    #[test]
    fn the_view_filter_keeps_rows_where_it_is_true() {
        let p = Program::new(vec![], Some("a >= 4 OR s = 'abc'".into()), vec![]);
        let out = p.apply(&batch()).unwrap();
        assert_eq!(out.keep, Some(vec![true, true, false, true]));
        assert_eq!((out.filtered, out.expr_errors), (1, 0));
    }

    #[test]
    fn feature_filters_mask_the_column_they_read() {
        let p = Program::new(
            vec![derived("y", "x * 2")],
            None,
            vec![
                FeatureFilter {
                    feature: "f".into(),
                    column: Some("y".into()),
                    filter: "a > 2".into(),
                    column_name: "f[filter]".into(),
                },
                FeatureFilter {
                    feature: "g".into(),
                    column: None,
                    filter: "b IN (2, 3)".into(),
                    column_name: "g[filter]".into(),
                },
            ],
        );
        let out = p.apply(&batch()).unwrap();
        let f = out.batch.column_by_name("f[filter]").unwrap();
        let f = f.as_any().downcast_ref::<Float64Array>().unwrap();
        assert_eq!(
            f.iter().collect::<Vec<_>>(),
            [Some(3.0), None, None, Some(-4.0)]
        );
        let g = out.batch.column_by_name("g[filter]").unwrap();
        let g = g.as_any().downcast_ref::<Int64Array>().unwrap();
        assert_eq!(
            g.iter().collect::<Vec<_>>(),
            [Some(1), None, Some(1), Some(1)]
        );
    }

    #[test]
    fn errors_name_the_field_and_the_position() {
        let schema = batch().schema();
        let bind = |p: Program| p.check(&schema).unwrap_err();
        let e = bind(Program::new(vec![derived("z", "a + nope")], None, vec![]));
        assert_eq!(e.field, "columns.z.expr");
        assert!(e.error.message.contains("nope"), "{e:?}");
        assert_eq!(e.error.position, Some((1, 5)), "{e:?}");
        let e = bind(Program::new(vec![], Some("a + 1".into()), vec![]));
        assert_eq!(e.field, "filter");
        assert!(e.error.message.contains("boolean"), "{e:?}");
        let e = bind(Program::new(vec![], Some("s + 1 > 2".into()), vec![]));
        assert!(e.error.message.contains("Utf8"), "{e:?}");
        // A type error points at the innermost part that fails.
        let e = bind(Program::new(
            vec![derived("z", "1 + (s * 2)")],
            None,
            vec![],
        ));
        assert!(e.error.message.contains("Utf8"), "{e:?}");
        assert_eq!(e.error.position, Some((1, 6)), "{e:?}");
        let e = bind(Program::new(vec![derived("a", "b + 1")], None, vec![]));
        assert!(e.error.message.contains("name of a column"), "{e:?}");
        let e = check_syntax("a + ").unwrap_err();
        assert!(e.message.contains("expression"), "{e:?}");
        let e = check_syntax("a + 1 )").unwrap_err();
        assert_eq!(e.position, Some((1, 7)), "{e:?}");
    }

    /// The deepest expression accepted compiles and runs on a thread with a small
    /// stack; a deeper one (as long as a file may hold) is refused when it is parsed.
    #[test]
    fn deep_expressions_are_refused_and_the_deepest_accepted_runs_on_a_small_stack() {
        let chain = |n: usize| vec!["a"; n].join("+");
        let deepest = chain(MAX_DEPTH - 1);
        let out = std::thread::Builder::new()
            .stack_size(512 * 1024)
            .spawn(move || {
                let p = Program::new(vec![derived("y", &deepest)], None, vec![]);
                p.apply(&batch()).map(|a| a.batch.num_columns())
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(out.unwrap(), 5);
        let e = check_syntax(&chain(4_000)).unwrap_err();
        assert!(e.message.contains("levels deep"), "{e:?}");
        let e = check_syntax(&format!("{}1{}", "(".repeat(200), ")".repeat(200))).unwrap_err();
        assert!(!e.message.is_empty());
    }

    #[test]
    fn columns_of_lists_the_names_an_expression_reads() {
        assert_eq!(
            columns_of("CASE WHEN Amount > 2 THEN upper(\"Status\") ELSE s END || amount"),
            ["amount", "Status", "s"]
        );
        assert!(columns_of("1 + ").is_empty());
    }

    /// The functions the README lists are there.
    #[test]
    fn the_documented_functions_exist() {
        let names = function_names();
        for f in [
            "abs",
            "ceil",
            "floor",
            "round",
            "sqrt",
            "ln",
            "log10",
            "power",
            "exp",
            "sin",
            "lower",
            "upper",
            "trim",
            "substr",
            "left",
            "right",
            "length",
            "replace",
            "concat",
            "split_part",
            "starts_with",
            "strpos",
            "regexp_like",
            "regexp_replace",
            "regexp_match",
            "date_trunc",
            "date_part",
            "to_timestamp",
            "coalesce",
            "nullif",
        ] {
            assert!(names.iter().any(|n| n == f), "{f} is not available");
        }
    }

    #[test]
    fn a_batch_without_expressions_is_unchanged_and_compiles_once() {
        let p = Program::new(vec![derived("y", "x + 1")], None, vec![]);
        let b = batch();
        p.apply(&b).unwrap();
        let first = Arc::clone(&p.bound.lock().unwrap().as_ref().unwrap().1);
        p.apply(&b).unwrap();
        let again = Arc::clone(&p.bound.lock().unwrap().as_ref().unwrap().1);
        assert!(Arc::ptr_eq(&first, &again));
        assert!(Program::new(vec![], None, vec![]).is_empty());
    }
}
